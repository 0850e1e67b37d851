"""Helpers of the fused-kernel tests (test_fused.py, test_fused_precision.py)."""
from __future__ import annotations

import copy
import os

import pytest
import timm
import torch
from torch import nn

import sanet
from sanet.ops import bn_shuffle_attention, load_cpu_ext


def require_cpu_ext() -> None:
    """Skip the calling test module where the C++ kernels can't be built (a clean fallback
    exists), except under SANET_REQUIRE_EXT (make test), where that is an error."""
    if load_cpu_ext() is None:
        if os.environ.get("SANET_REQUIRE_EXT", "") not in ("", "0"):
            raise RuntimeError("SANET_REQUIRE_EXT is set but the CPU extension did not build")
        pytest.skip("fused CPU extension unavailable (no compiler?)", allow_module_level=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against b."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def sa_params(sa):
    return [sa.cweight, sa.cbias, sa.sweight, sa.sbias, sa.gn.weight, sa.gn.bias]


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def bn_sa_pair(C, G, gen, dtype, momentum=0.1, affine=True):
    bn = nn.BatchNorm2d(C, momentum=momentum, affine=affine).to(dtype)
    sa = sanet.ShuffleAttention(C, G).to(dtype)
    randomize(sa, gen)
    randomize(bn, gen)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=gen))
        bn.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
    ref_sa = copy.deepcopy(sa)
    ref_sa.impl = "reference"
    return bn, sa, copy.deepcopy(bn), ref_sa


def fused_and_unfused_models(num_classes: int, gen: torch.Generator, **kwargs):
    """sa_resnet_test (``kwargs`` to ``create_model``) in fp64 with random SA parameters, and a
    copy that runs op by op."""
    torch.manual_seed(0)
    fused = timm.create_model("sa_resnet_test", num_classes=num_classes, **kwargs).double()
    for m in fused.modules():
        if isinstance(m, sanet.ShuffleAttention):
            randomize(m, gen)
    unfused = copy.deepcopy(fused)
    for m in unfused.modules():
        if isinstance(m, sanet.ShuffleAttention):
            m.impl = "reference"  # reference SA never fuses with BatchNorm
    return fused, unfused


def large_mean_input(hw, gen: torch.Generator) -> torch.Tensor:
    """(4, 16, *hw) input 1000 standard deviations from 0, exactly representable in fp32 and
    with channel means exactly 1000: fp32 can then be exact to ~1e-7 (test_large_mean_*)."""
    half = (torch.randn(2, 16, *hw, generator=gen) * 256).round() / 256
    return torch.cat([half, -half]) + 1000.0


def fused_and_fp64(mode: str, bn: nn.Module, sa: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """Output and gradients (input, SA parameters, BatchNorm's unless ``mode`` is "sa") of the
    fused op in fp32 and of BatchNorm then the reference SA in fp64, by name."""
    from sanet.ops import bn_shuffle_attention

    results = []
    for dtype, impl in ((torch.float32, "fused"), (torch.float64, "reference")):
        b, s = copy.deepcopy(bn).to(dtype), copy.deepcopy(sa).to(dtype)
        s.impl = impl
        xi = x.to(dtype).requires_grad_(True)
        if mode == "sa":
            y = s(xi)
        else:
            y = bn_shuffle_attention(xi, b, s) if impl == "fused" else s(b(xi))
        inputs = [xi, *s.parameters()] + ([] if mode == "sa" else list(b.parameters()))
        results.append([y, *torch.autograd.grad(y, inputs, g.to(dtype))])
    names = ["out", "input", *(n for n, _ in sa.named_parameters()), "bn.weight", "bn.bias"]
    return {name: (fused, ref64) for name, fused, ref64 in zip(names, *results)}


def run_bn_sa(bn, sa, ref_bn, ref_sa, x, sc, relu, gen):
    """``bn_shuffle_attention`` (fused) and BatchNorm then SA (the reference modules) on the same
    input: each one's (output, gradients of input, shortcut when ``relu``, SA and BN parameters)."""
    xf = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    scf = sc.clone().requires_grad_(True) if relu else None
    scr = sc.clone().requires_grad_(True) if relu else None
    y = bn_shuffle_attention(xf, bn, sa, scf, relu=relu)
    y_ref = ref_sa(ref_bn(xr))
    if relu:
        y_ref = torch.relu(y_ref + scr)
    g = torch.randn(y.shape, generator=gen, dtype=x.dtype)
    fused_in = [xf] + ([scf] if relu else []) + list(sa.parameters()) + list(bn.parameters())
    ref_in = [xr] + ([scr] if relu else []) + list(ref_sa.parameters()) + list(ref_bn.parameters())
    return (y, grads(y, fused_in, g)), (y_ref, grads(y_ref, ref_in, g))
