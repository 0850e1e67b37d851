"""The GPU path (Triton kernels) in half precision and with mixed parameter dtypes, against
the fp64 oracle: the companion of ``test_cuda.py`` (same device selection and helpers; run
on a GPU by ``benchmarks/gpu_check.sh``, on the CPU under the Triton interpreter by
``tests/test_triton_interpreter.py``)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from sanet.ops import fused_sa_supported

from conftest import SA_PARAM_NAMES, case_seed, randomize_sa_, rel_err
from test_cuda import DEVICE, bn_sa_pair, fwd_bwd, make_input, oracle, run_tail, sa_on_device  # skips without a device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,scale", [((2, 16, 9, 10), 4, 1.0), ((4, 8, 64, 64), 2, 10.0)],
                         ids=["small", "sums-past-fp16"])
def test_bn_sa_tail_half_precision_training(dtype, shape, groups, scale):
    """BatchNorm and SA both in fp16/bf16 (a model.half()), training mode, against fp64 with
    the same (rounded) parameters, input and gradient. BatchNorm's sums over the batch, read
    back for dx, must not be kept in its dtype: sum(gz) over a 4x64x64 batch of gradients
    ~10 is ~1e5, past fp16's 65504 (dx was inf), and the interpreter turns float64 -> bf16
    into 0 (dx NaN). fp32 inside, so the only error left is the final rounding; a BatchNorm
    gradient past fp16's range is inf, as the fp16 parameter's gradient is op by op."""
    gen = torch.Generator().manual_seed(case_seed(shape, groups, scale))
    bn, sa = bn_sa_pair(shape[1], groups, gen, dtype=dtype)
    bn64, sa64 = copy.deepcopy(bn).double(), copy.deepcopy(sa).double()
    x = make_input(shape, "contiguous", gen, dtype) * 2 + 0.5
    if not fused_sa_supported(x):
        pytest.skip(f"no fused kernel for {dtype} on {DEVICE.type}")
    sc = make_input(shape, "contiguous", gen, dtype)
    g = ((torch.randn(shape, generator=gen) + 1) * scale).to(DEVICE, dtype)  # sums of one sign
    y, grads = run_tail(bn, sa, x, sc, False, g, True)
    y64, grads64 = run_tail(bn64, sa64, x.double(), sc.double(), False, g.double(), False)
    bound = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    names = ["out", "input", "shortcut", *(n for n, _ in sa.named_parameters()), "bn.weight", "bn.bias"]
    overflowed = 0
    for name, a, b in zip(names, [y, *grads], [y64, *grads64]):
        assert a.dtype == dtype, name
        over = b.abs() > torch.finfo(dtype).max
        overflowed += int(over.sum())
        assert torch.equal(a[over], b[over].to(dtype)), f"{name}: {a[over]} where fp64 has {b[over]}"
        assert torch.isfinite(a[~over]).all(), name
        assert rel_err(a[~over], b[~over]) <= bound, f"{name}: {rel_err(a[~over], b[~over]):.3g}"
    assert (overflowed > 0) == (dtype == torch.float16 and scale > 1)  # the case is what it says
    assert rel_err(bn.running_mean, bn64.running_mean) <= bound
    assert rel_err(bn.running_var, bn64.running_var) <= bound


@pytest.mark.parametrize("gates", [torch.float16, torch.float64])
def test_parameter_gradients_in_each_parameters_own_dtype(gates):
    """Gates in fp16 (or fp64) beside an fp32 GroupNorm, fp32 input: each parameter's gradient
    comes in its own dtype, rounded once. All six came back in cweight's dtype (fp16:
    gn.weight's ~1e5 became inf). (fp32 input is computed in fp32: fp64 gates' gradients
    have fp32's precision.)"""
    gen = torch.Generator().manual_seed(23)
    sa = sa_on_device(16, 2, gen)
    with torch.no_grad():
        sa.sweight.fill_(1.0)
    sa.to(gates)
    sa.gn.float()
    x = (torch.randn(8, 16, 32, 32, generator=gen) * 100).to(DEVICE)
    out, grads = fwd_bwd(sa, x, torch.ones(x.shape, device=DEVICE))
    _, exact = oracle(sa, x, torch.ones(x.shape, device=DEVICE))
    params = dict(sa.named_parameters())
    for name, got, want in zip(SA_PARAM_NAMES, grads[1:], exact[1:]):
        dtype = params[name].dtype
        assert got.dtype == dtype, name
        if dtype == torch.float16:  # inf where the exact value is past fp16's range
            finite = want.half().isfinite()
            assert torch.equal(got.isfinite(), finite), name
            got, want = got[finite], want[finite]
        tol = 1e-3 if dtype == torch.float16 else 1e-5
        assert rel_err(got.double(), want) <= tol, (name, rel_err(got.double(), want))
    assert params["gn.weight"].dtype == torch.float32 and grads[5].abs().max() > 65504


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((4, 256, 14, 14), 64), ((2, 64, 56, 56), 8), ((2, 32, 9), 4)])
def test_half_precision_within_reference_precision(dtype, shape, groups):
    """fp16/bf16 input: the kernel computes statistics and gates in fp32 and rounds once, so
    it is at least as close to the fp64 oracle as the authors' formulation run in that dtype."""
    gen = torch.Generator().manual_seed(11)
    sa = sa_on_device(shape[1], groups, gen, dtype=dtype)
    ref = copy.deepcopy(sa)
    ref.impl = "reference"
    x = make_input(shape, "contiguous", gen, dtype)
    g = torch.randn(shape, generator=gen).to(DEVICE)
    out, grads = fwd_bwd(sa, x, g)
    out_ref, grads_ref = fwd_bwd(ref, x, g)
    out64, grads64 = oracle(sa, x, g)
    bound = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    err, err_ref = rel_err(out, out64), rel_err(out_ref, out64)
    assert err <= max(bound, 1.5 * err_ref), f"output {err:.3g} (reference in {dtype}: {err_ref:.3g})"
    for name, a, a_ref, b in zip(("input",) + SA_PARAM_NAMES, grads, grads_ref, grads64):
        err, err_ref = rel_err(a, b), rel_err(a_ref, b)
        assert err <= max(bound, 1.5 * err_ref), f"{name}: {err:.3g} (reference in {dtype}: {err_ref:.3g})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_under_autocast(dtype):
    """Mixed precision training step: SA receives the half-precision conv output."""
    torch.manual_seed(15)
    model = timm.create_model("sa_resnet_test", num_classes=10)
    randomize_sa_(model, torch.Generator().manual_seed(15))
    model = model.to(DEVICE).train()
    x = torch.randn(4, 3, 64, 64, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = model(x)
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype):
        y_half = model(x).float()
    with torch.no_grad():
        y32 = model(x)
    assert rel_err(y_half, y32) <= 5e-2
