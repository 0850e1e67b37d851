"""The GPU path (Triton kernels) against the authors' formulation, on a CUDA device.

On a GPU machine: ``python -m pytest tests/test_cuda.py`` (``benchmarks/gpu_check.sh`` runs
it). Without one, ``tests/test_triton_interpreter.py`` runs this file on the CPU with the
Triton kernels under ``TRITON_INTERPRET=1`` (``SANET_TEST_DEVICE=cpu
SANET_TEST_TRITON_ON_CPU=1``, see conftest.py); ``SANET_TEST_DEVICE=cpu`` alone runs it on
the C++ kernels (the half-precision cases then take the PyTorch fallback).

Oracle: the step-by-step reference of ``test_layer.py`` in float64 on the same device, with
the same parameter values. Every case checks the output and the gradients of the input and
all six SA parameters (and BatchNorm's, where it is fused) on fresh random inputs and
trained-looking (random) parameters.
"""
from __future__ import annotations

import copy
import os

import pytest
import timm
import torch
from torch import nn

import sanet
from sanet.analysis.memory import saved_tensor_bytes
from sanet.ops import bn_shuffle_attention, fused_sa_supported, sa_op, triton_sa

from conftest import SA_PARAM_NAMES, case_seed, randomize_sa_, rel_err
from fused_utils import fused_and_fp64, large_mean_input
from sa_reference import authors_sa_nd

DEVICE = torch.device(os.environ.get("SANET_TEST_DEVICE", "cuda"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

def triton_active() -> bool:
    return sa_op.KERNELS[DEVICE.type][0] is sa_op.KERNELS["cuda"][0]


def interpreted() -> bool:
    """The Triton kernels on CPU tensors under TRITON_INTERPRET=1: one program (plane) at a
    time in Python, some seconds per hundred large planes."""
    return DEVICE.type == "cpu" and triton_active()


def tail_channels(hw) -> int:
    """Channels of a block-tail case: 64, or 16 for large planes in the interpreter (the
    plane-size paths under test are the same; the interpreter's time is per plane)."""
    return 16 if interpreted() and hw[0] * hw[1] > 256 else 64


@pytest.fixture(params=["auto", "loop"])
def tiling(request, monkeypatch):
    """'loop': planes over 32 elements are walked in chunks of 16 (the kernels' path for
    planes too large for registers), so small tests cover it."""
    if request.param == "loop":
        if not triton_active():
            pytest.skip("tiling applies to the Triton kernels")
        monkeypatch.setattr(triton_sa, "_MAX_TILE", 32)
        monkeypatch.setattr(triton_sa, "_LOOP_BLOCK", 16)
        # _tiling is cached per plane size: without this, a size an earlier test saw keeps
        # its register tiling and the 'loop' case silently tests nothing new.
        triton_sa._tiling.cache_clear()
    yield request.param
    if request.param == "loop":
        triton_sa._tiling.cache_clear()


CASES = [
    # shape, groups, layout
    ((2, 64, 7, 9), 8, "contiguous"),
    ((1, 128, 5, 5), 64, "contiguous"),         # batch 1, G = 64
    ((3, 32, 4, 6), 1, "contiguous"),           # G = 1
    ((2, 64, 7, 9), 8, "channels_last"),
    ((2, 64, 7, 9), 8, "non_contiguous"),
    ((2, 16, 11), 4, "contiguous"),             # 1-D
    ((2, 32, 3, 5, 4), 8, "contiguous"),        # 3-D
    ((2, 256, 56, 56), 64, "contiguous"),       # 3136-element planes: one 4096 tile, or chunks ('loop')
    ((1, 64, 45, 47), 32, "channels_last"),     # odd plane: a masked tail in the tile and the last chunk
    ((4, 128, 1, 1), 16, "contiguous"),         # one-pixel planes (GroupNorm variance 0)
    ((2, 256, 3, 3), 1, "contiguous"),          # G = 1: 128 gate parameters each
]


def make_input(shape, layout, gen, dtype=torch.float32):
    if layout == "non_contiguous":
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    else:
        x = torch.randn(shape, generator=gen)
    x = x.to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


def fwd_bwd(module, x, grad_out):
    """Output and gradients (input, six parameters) of ``module`` at ``x``."""
    x = x.detach().requires_grad_(True)
    params = dict(getattr(module, "_orig_mod", module).named_parameters())  # torch.compile wraps
    out = module(x)
    grads = torch.autograd.grad(out, [x] + [params[n] for n in SA_PARAM_NAMES], grad_out.to(out.dtype))
    return out, grads


def oracle(module, x, grad_out):
    """Float64 reference with the module's parameter values."""
    p = {n: v.detach().double().requires_grad_(True) for n, v in module.named_parameters()}
    x64 = x.detach().double().contiguous().requires_grad_(True)
    out = authors_sa_nd(x64, p, module.groups, module.gn.eps)
    grads = torch.autograd.grad(out, [x64] + [p[n] for n in SA_PARAM_NAMES], grad_out.double())
    return out, grads


def sa_on_device(channels, groups, gen, impl="auto", dtype=torch.float32):
    sa = randomize_sa_(sanet.ShuffleAttention(channels, groups, impl=impl), gen)
    return sa.to(DEVICE, dtype)


def test_triton_kernels_are_used(monkeypatch):
    """Where the Triton kernels are the device's, the layer and the block tail call them."""
    if not triton_active():
        pytest.skip("the device's kernels are not Triton's")
    calls = []
    fwd, bwd, update = sa_op.KERNELS[DEVICE.type]
    monkeypatch.setitem(sa_op.KERNELS, DEVICE.type,
                        (lambda *a: calls.append("fwd") or fwd(*a), lambda *a: calls.append("bwd") or bwd(*a),
                         lambda *a: calls.append("update") or update(*a)))
    x = torch.randn(2, 32, 5, 5, device=DEVICE, requires_grad=True)
    sanet.ShuffleAttention(32, 4).to(DEVICE)(x).sum().backward()
    model = timm.create_model("sa_resnet_test", num_classes=4).to(DEVICE)
    model(torch.randn(2, 3, 32, 32, device=DEVICE)).sum().backward()
    tails = sum(isinstance(m, sanet.ShuffleAttention) for m in model.modules())
    assert calls.count("fwd") == calls.count("bwd") == 1 + tails  # the layer, every block tail
    assert calls.count("update") == tails  # BatchNorm's running statistics, once per block


@pytest.mark.parametrize("shape,groups,layout", CASES)
def test_fused_matches_oracle_fp32(shape, groups, layout):
    gen = torch.Generator().manual_seed(case_seed(shape, groups, layout))
    sa = sa_on_device(shape[1], groups, gen)
    x = make_input(shape, layout, gen)
    assert fused_sa_supported(x)
    g = torch.randn(shape, generator=gen).to(DEVICE)
    out, grads = fwd_bwd(sa, x, g)
    out64, grads64 = oracle(sa, x, g)
    assert out.dtype == x.dtype and out.shape == x.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, out64) <= 1e-5
    assert rel_err(grads[0], grads64[0]) <= 1e-5
    if shape[2:] == (1, 1):
        # exactly 0: gn.weight multiplies x - mean, which is 0 on a one-pixel plane
        assert grads[5].abs().max() <= 1e-6 * g.norm()
        grads, grads64 = grads[:5] + grads[6:], grads64[:5] + grads64[6:]
    assert_param_grads_close(grads[1:], grads64[1:])


def assert_param_grads_close(got, want, tol=1e-5):
    """Parameter gradients: as one vector (the gradient with respect to all of the layer's
    parameters) within ``tol``, each one within ``100 * tol``. A single parameter's gradient
    is one sum over the batch of terms of both signs; where it cancels to near 0, no fp32
    computation (the authors' formulation included) keeps 1e-5 relative to it."""
    assert rel_err(torch.cat([a.flatten() for a in got]), torch.cat([b.flatten() for b in want])) <= tol
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= 100 * tol, f"parameter gradient {i}: {rel_err(a, b):.3g}"


@pytest.mark.parametrize("shape,groups,layout", [((2, 64, 7, 9), 8, "contiguous"),
                                                 ((1, 64, 45, 47), 32, "channels_last"),
                                                 ((2, 32, 3, 5, 4), 8, "non_contiguous"),
                                                 ((3, 32, 1, 1), 4, "contiguous")])
def test_fused_matches_oracle_fp32_tiled(shape, groups, layout, tiling):
    test_fused_matches_oracle_fp32(shape, groups, layout)


# ----------------------------------------------------------------- BatchNorm -> SA -> + -> ReLU
def bn_sa_pair(channels, groups, gen, momentum=0.1, affine=True, dtype=torch.float64):
    bn = nn.BatchNorm2d(channels, momentum=momentum, affine=affine)
    sa = randomize_sa_(sanet.ShuffleAttention(channels, groups), gen)
    with torch.no_grad():
        for p in bn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    return bn.to(DEVICE, dtype), sa.to(DEVICE, dtype)


def run_tail(bn, sa, x, sc, relu, g, fused):
    """relu(sa(bn(x)) + sc) fused, or op by op with the authors' SA; output and gradients of
    x, sc, SA's and BatchNorm's parameters."""
    x = x.detach().requires_grad_(True)
    sc = sc.detach().requires_grad_(True)
    if fused:
        y = bn_shuffle_attention(x, bn, sa, sc, relu=relu)
    else:
        ref = copy.deepcopy(sa)
        ref.impl = "reference"
        y = ref(bn(x)) + sc
        y = torch.relu(y) if relu else y
        sa = ref
    inputs = [x, sc] + list(sa.parameters()) + list(bn.parameters())
    return y, torch.autograd.grad(y, inputs, g.to(y.dtype))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("momentum,affine,hw", [(0.1, True, (6, 7)), (None, True, (6, 7)), (0.0, True, (6, 7)),
                                                (0.1, False, (6, 7)), (0.1, True, (33, 35))])
def test_bn_sa_tail_matches_oracle(train, relu, momentum, affine, hw, tiling):
    """The fused block tail in fp32 against fp64 (every gradient, running statistics); both
    fp32 forms round, so the fused one must be within 1e-5 or no worse than twice the
    op-by-op fp32 error (BatchNorm's parameter gradients are sums of both signs)."""
    gen = torch.Generator().manual_seed(21)
    c = tail_channels(hw)
    bn64, sa64 = bn_sa_pair(c, c // 8, gen, momentum, affine)
    pairs = {"fused": (copy.deepcopy(bn64).float(), copy.deepcopy(sa64).float()),
             "ref32": (copy.deepcopy(bn64).float(), copy.deepcopy(sa64).float()), "ref64": (bn64, sa64)}
    for bn, _ in pairs.values():
        bn.train(train)
    x = (torch.randn(3, c, *hw, generator=gen) * 2 + 0.5).to(DEVICE)
    sc = torch.randn(3, c, *hw, generator=gen).to(DEVICE)
    for step in range(2):  # running statistics must update exactly once per call
        g = torch.randn(x.shape, generator=gen).to(DEVICE)
        res = {}
        for k, (bn, sa) in pairs.items():
            dtype = torch.float64 if k == "ref64" else torch.float32
            res[k] = run_tail(bn, sa, x.to(dtype), sc.to(dtype), relu, g, k == "fused")
        (y, gf), (y32, g32), (y64, g64) = res["fused"], res["ref32"], res["ref64"]
        assert rel_err(y, y64) <= max(1e-5, 2 * rel_err(y32, y64))
        for i, (a, r32, r64) in enumerate(zip(gf, g32, g64)):
            if relu and a.shape == x.shape:
                # a ReLU whose input is within rounding of 0 may flip; compare where it can't
                keep = y64.abs() > 1e-4
                a, r32, r64 = a[keep], r32[keep], r64[keep]
            assert rel_err(a, r64) <= max(1e-5, 2 * rel_err(r32, r64)), f"gradient {i}"
        bn_f, bn_64 = pairs["fused"][0], pairs["ref64"][0]
        assert rel_err(bn_f.running_mean, bn_64.running_mean) <= 1e-6
        assert rel_err(bn_f.running_var, bn_64.running_var) <= 1e-6
        assert bn_f.num_batches_tracked.item() == (step + 1 if train else 0)


@pytest.mark.parametrize("n", [20, 35])
def test_bn_sa_tail_batch_larger_than_a_sample_block(n):
    """Training BatchNorm merges per-sample statistics in blocks of samples (the Triton
    kernel's BLOCK_N = 16, the C++ kernels' 32): batches of more than one block, the last
    partial, in fp32 against the fp64 oracle (output, gradients, running statistics)."""
    gen = torch.Generator().manual_seed(case_seed("batch", n))
    bn64, sa64 = bn_sa_pair(16, 2, gen)
    bn, sa = copy.deepcopy(bn64).float(), copy.deepcopy(sa64).float()
    bn.train(), bn64.train()
    # samples of different scales and means: each block of samples has its own statistics
    scale = torch.linspace(0.5, 3, n).reshape(n, 1, 1, 1)
    x = ((torch.randn(n, 16, 3, 4, generator=gen) + scale) * scale).to(DEVICE)
    sc = torch.randn(x.shape, generator=gen).to(DEVICE)
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    y, gf = run_tail(bn, sa, x, sc, True, g, True)
    y64, g64 = run_tail(bn64, sa64, x.double(), sc.double(), True, g, False)
    assert rel_err(y, y64) <= 1e-5
    keep = y64.abs() > 1e-4  # a ReLU whose input is within rounding of 0 may flip
    assert rel_err(gf[0][keep], g64[0][keep]) <= 1e-5
    assert rel_err(torch.cat([a.flatten() for a in gf[2:]]), torch.cat([b.flatten() for b in g64[2:]])) <= 1e-5
    assert rel_err(bn.running_mean, bn64.running_mean) <= 1e-6
    assert rel_err(bn.running_var, bn64.running_var) <= 1e-6


@pytest.mark.parametrize("where", [0, 7], ids=["first", "middle"])
def test_inf_in_a_plane_like_the_reference(where):
    """An inf saturates a channel-branch gate (finite outputs elsewhere in its plane), as in the
    reference and the C++ kernel; the spatial branch's GroupNorm makes its plane NaN in all."""
    gen = torch.Generator().manual_seed(4)
    sa = sa_on_device(16, 2, gen)
    ref = copy.deepcopy(sa)
    ref.impl = "reference"
    x = torch.randn(2, 16, 16, generator=gen).to(DEVICE)
    x[0, :, where] = float("inf")
    with torch.no_grad():
        y, r = sa(x), ref(x)
    assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isinf(), r.isinf())
    assert r.isfinite().sum() > r.numel() // 2  # the channel-branch planes kept their finite values
    torch.testing.assert_close(y[r.isfinite()], r[r.isfinite()], rtol=1e-5, atol=1e-6)


def test_bad_op_arguments_are_refused_before_a_launch():
    """The Triton launchers check what the C++ kernel checks: a wrong size would be read or
    written out of bounds on the GPU."""
    if not triton_active():
        pytest.skip("the C++ kernel checks its arguments in C++")
    x = torch.randn(2, 24, 3, 3, device=DEVICE)
    p = [torch.randn(3, device=DEVICE) for _ in range(6)]

    def op(shortcut, params, groups, bn_mean=None, bn_var=None):
        return torch.ops.sanet.sa_forward(x, shortcut, *params, groups, 1e-5, None, None, bn_mean, bn_var,
                                          False, 1e-5, False)

    with pytest.raises(ValueError, match=r"valid groups for 24 channels: \[1, 2, 3, 4, 6, 12\]"):
        op(None, p, 5)
    with pytest.raises(ValueError, match="gn_bias must hold C / \\(2 \\* groups\\) = 24 / \\(2 \\* 4\\) = 3"):
        op(None, p[:5] + [torch.zeros(4, device=DEVICE)], 4)
    with pytest.raises(ValueError, match="shortcut must have x's shape"):
        op(x[:1], p, 4)
    with pytest.raises(ValueError, match="shortcut must have x's shape .* and dtype"):
        op(x.double(), p, 4)
    with pytest.raises(ValueError, match=r"bn_mean must hold one value per channel \(24\)"):
        op(None, p, 4, torch.zeros(23, device=DEVICE), torch.ones(24, device=DEVICE))
    out, pm, pv, _, _ = op(None, p, 4)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="grad must have x's shape"):
        torch.ops.sanet.sa_backward(x[:1], x, None, pm, pv, *p, 4, 1e-5, None, None, None, None, False, 1e-5)
    with pytest.raises(ValueError, match="grad must have x's shape .* and dtype"):
        torch.ops.sanet.sa_backward(x.double(), x, None, pm, pv, *p, 4, 1e-5, None, None, None, None, False, 1e-5)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("hw", [(6, 7), (33, 35)])
def test_non_default_eps_reaches_the_kernels(train, hw):
    """Each norm's own eps on small-variance planes, where eps changes the result: SA's
    GroupNorm eps in the layer, and BatchNorm's and SA's in the block tail."""
    gen = torch.Generator().manual_seed(23)
    c = tail_channels(hw)
    sa = randomize_sa_(sanet.ShuffleAttention(c, c // 16, eps=1e-2), gen).to(DEVICE)
    x = (torch.randn(2, c, *hw, generator=gen) * 0.05 + 0.3).to(DEVICE)
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    (out, grads), (out64, grads64) = fwd_bwd(sa, x, g), oracle(sa, x, g)
    assert rel_err(out, out64) <= 1e-5 and rel_err(grads[0], grads64[0]) <= 1e-5
    assert_param_grads_close(grads[1:], grads64[1:])
    bn64, sa64 = bn_sa_pair(c, c // 8, gen)
    bn64.eps, sa64.gn.eps = 1e-3, 1e-4
    with torch.no_grad():
        bn64.weight.mul_(0.05)  # small BN outputs, so SA's eps matters too
    bn, sa = copy.deepcopy(bn64).float(), copy.deepcopy(sa64).float()
    bn.train(train)
    bn64.train(train)
    x = x * 0.6
    y, gf = run_tail(bn, sa, x, x.flip(0), False, g, True)
    y64, g64 = run_tail(bn64, sa64, x.double(), x.flip(0).double(), False, g, False)
    assert rel_err(y, y64) <= 1e-5
    assert rel_err(torch.cat([a.flatten() for a in gf]), torch.cat([b.flatten() for b in g64])) <= 1e-4


@pytest.mark.parametrize("mode", ["sa", "bn_train", "bn_eval"])
@pytest.mark.parametrize("hw", [(4, 4), (64, 64)])
def test_large_mean_against_fp64(mode, hw, tiling):
    """tests/test_fused_precision.py's case for the CPU kernel: input whose mean is 1000 standard
    deviations from 0, built exactly representable in fp32 and with channel means exactly
    1000, so fp32 can be exact to ~1e-7. Rounding b = beta - mean * a (~1000 a) to fp32, or
    the plane mean the gate is centred on, shifts whole planes by 1e-5 to 1e-4 of their
    spread. (8, 8) planes take the chunked path under the 'loop' tiling.)"""
    if triton_active():
        pytest.skip("the Triton kernels are not centred on each plane's mean (a known limit, "
                    "docs/kernels.md): the change that centres them awaits a GPU to be checked on")
    gen = torch.Generator().manual_seed(3)
    bn, sa = bn_sa_pair(16, 2, gen, dtype=torch.float32)
    with torch.no_grad():
        bn.running_mean.fill_(1000.0)
    bn.train(mode == "bn_train")
    x = large_mean_input(hw, gen).to(DEVICE)
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    errs = {name: rel_err(fused, ref64) for name, (fused, ref64) in fused_and_fp64(mode, bn, sa, x, g).items()}
    assert max(errs.values()) <= 3e-6, ", ".join(f"{k} {v:.2g}" for k, v in errs.items())


@pytest.mark.parametrize("shape", [(0, 32, 4, 4), (2, 32, 0, 5)], ids=["no-samples", "no-pixels"])
def test_empty_inputs(shape):
    """Empty batches and planes without pixels: empty output and gradient, zero parameter
    gradients (the planes' statistics are 0/0, which must not reach the sums)."""
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    sa = sanet.ShuffleAttention(32, 4).to(DEVICE)
    y = sa(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in sa.parameters())


def test_strided_gate_parameters():
    """Parameters that are views with other strides (slices of a larger tensor) give the same
    output and gradients as contiguous ones: the kernels index them as dense vectors."""
    from sanet.ops import shuffle_attention_fused

    gen = torch.Generator().manual_seed(21)
    c, groups = 4, 8
    big = [torch.randn(1, 2 * c, 1, 1, generator=gen).to(DEVICE).requires_grad_(True) for _ in range(4)]
    big += [torch.randn(2 * c, generator=gen).to(DEVICE).requires_grad_(True) for _ in range(2)]
    strided = [t[:, ::2] if t.dim() == 4 else t[::2] for t in big]
    dense = [t.detach().clone().requires_grad_(True) for t in strided]
    x = torch.randn(2, 2 * c * groups, 5, 6, generator=gen).to(DEVICE)
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    outs = [shuffle_attention_fused(x, *p, groups) for p in (strided, dense)]
    grads = [torch.autograd.grad(o, p, g) for o, p in zip(outs, (strided, dense))]
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_compile_fullgraph_matches_eager():
    gen = torch.Generator().manual_seed(12)
    sa = sa_on_device(128, 16, gen)
    x = make_input((4, 128, 20, 20), "contiguous", gen)
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    out, grads = fwd_bwd(sa, x, g)
    compiled = torch.compile(sa, fullgraph=True)
    out_c, grads_c = fwd_bwd(compiled, x, g)
    # Compiled and eager call the same kernels, but need not round alike (an H100 run gave
    # 1.9e-6 on one parameter gradient): both are held to the fp64 oracle's bound.
    out64, grads64 = oracle(sa, x, g)
    assert rel_err(out_c, out) <= 1e-6
    assert rel_err(out_c, out64) <= 1e-5
    assert rel_err(grads_c[0], grads64[0]) <= 1e-5
    assert_param_grads_close(grads_c[1:], grads64[1:])
    assert_param_grads_close(grads_c[1:], grads[1:])


def test_deterministic():
    gen = torch.Generator().manual_seed(13)
    sa = sa_on_device(256, 64, gen)
    # the interpreter runs programs one after another (no order to vary): 2 samples, not 8
    x = make_input((2 if interpreted() else 8, 256, 28, 28), "contiguous", gen)
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    first, second = fwd_bwd(sa, x, g), fwd_bwd(sa, x, g)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_layer_keeps_only_its_input_for_backward():
    x = torch.randn(4, 256, 14, 14, device=DEVICE, requires_grad=True)
    fused = saved_tensor_bytes(lambda: sanet.ShuffleAttention(256, 64).to(DEVICE)(x))
    ref = saved_tensor_bytes(lambda: sanet.ShuffleAttention(256, 64, impl="reference").to(DEVICE)(x))
    x_bytes = x.numel() * x.element_size()
    assert fused["bytes"] <= x_bytes + 4 * 256 * 8 * 2 + 4096  # x, per-plane statistics, parameters
    assert ref["bytes"] >= 2 * x_bytes


def test_model_matches_reference_sa_in_training():
    """sa_resnet_test on the device: default SA vs the authors' formulation, same weights,
    BatchNorm in training mode (every gradient, running statistics)."""
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would dominate the comparison
    try:
        torch.manual_seed(14)
        model = timm.create_model("sa_resnet_test", num_classes=10)
        randomize_sa_(model, torch.Generator().manual_seed(14))
        model = model.to(DEVICE).train()
        ref = copy.deepcopy(model)
        for m in ref.modules():
            if isinstance(m, sanet.ShuffleAttention):
                m.impl = "reference"
        x = torch.randn(4, 3, 64, 64, device=DEVICE)
        y, y_ref = model(x), ref(x)
        assert rel_err(y, y_ref) <= 1e-5
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            assert p.grad is not None, name
            assert rel_err(p.grad, p_ref.grad) <= 1e-4, f"{name}: {rel_err(p.grad, p_ref.grad):.3g}"
        for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
            assert torch.allclose(b.float(), b_ref.float(), rtol=1e-5, atol=1e-6), name
    finally:
        torch.backends.cudnn.allow_tf32 = True
