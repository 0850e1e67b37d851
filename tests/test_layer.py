"""ShuffleAttention against a step-by-step statement of SA-NET.md section 1.

The reference (``tests/sa_reference.py``) is written independently of sanet's code, the way
the authors' ``sa_layer`` computes it. Every ``impl`` of the module is checked against it
(output, input gradient and the gradient of all six parameters) with random parameter
values. Input errors are in ``test_layer_errors.py``, hooks on SA's GroupNorm in
``test_layer_hooks.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

import sanet
from sanet import ShuffleAttention

from conftest import SA_PARAM_NAMES, randomize_sa_, rel_err, require_fused
from sa_reference import (FP32_TOL, IMPLS, AuthorsSA, authors_sa_nd, check_against, make_pair, ref_params_of,
                          shuffle_index)


# --------------------------------------------------------------------------- the reference itself
def test_reference_matches_hand_computed_channels():
    """Pin the test's reference to section 1 by computing two output channels by hand."""
    C, G = 8, 2
    ref = randomize_sa_(AuthorsSA(C, G))
    x = torch.randn(2, C, 3, 5)
    out = ref(x)
    c = C // (2 * G)  # 2
    # out channel 2k+i = y channel i*C/2 + k. y channel 0 = group 0, channel-branch channel 0.
    s = x[:, 0].mean((-2, -1), keepdim=True)
    expect0 = x[:, 0] * torch.sigmoid(ref.cweight[0, 0] * s + ref.cbias[0, 0])
    torch.testing.assert_close(out[:, 0], expect0)
    # out channel 1 = y channel C/2 = 4 = group 1, channel-branch channel 0: same gate params.
    s4 = x[:, 4].mean((-2, -1), keepdim=True)
    torch.testing.assert_close(out[:, 1], x[:, 4] * torch.sigmoid(ref.cweight[0, 0] * s4 + ref.cbias[0, 0]))
    # out channel 2*3+1 = 7 = y channel 4+3 = 7 = group 1, spatial-branch channel 1.
    v = x[:, 7]
    mu, var = v.mean((-2, -1), keepdim=True), v.var((-2, -1), unbiased=False, keepdim=True)
    n = (v - mu) / torch.sqrt(var + 1e-5) * ref.gn.weight[1] + ref.gn.bias[1]
    torch.testing.assert_close(out[:, 7], v * torch.sigmoid(ref.sweight[0, 1] * n + ref.sbias[0, 1]))
    assert c == 2


def test_reference_nd_equals_literal_reference_on_4d():
    ref = randomize_sa_(AuthorsSA(32, 4))
    x = torch.randn(2, 32, 5, 7)
    p = dict(ref.named_parameters())
    assert rel_err(authors_sa_nd(x, p, 4), ref(x)) <= 1e-6


# --------------------------------------------------------------------------- parameters and init
@pytest.mark.parametrize("channels,groups", [(8, 1), (64, 8), (256, 64), (128, 64)])
def test_parameters_names_shapes_initial_values(channels, groups):
    m = ShuffleAttention(channels, groups)
    c = channels // (2 * groups)
    sd = m.state_dict()
    assert list(sd) == ["cweight", "cbias", "sweight", "sbias", "gn.weight", "gn.bias"]
    for name in ("cweight", "cbias", "sweight", "sbias"):
        assert sd[name].shape == (1, c, 1, 1), name
    assert sd["gn.weight"].shape == sd["gn.bias"].shape == (c,)
    assert torch.equal(sd["cweight"], torch.zeros(1, c, 1, 1))
    assert torch.equal(sd["cbias"], torch.ones(1, c, 1, 1))  # a bias initialised to 0 fails here
    assert torch.equal(sd["sweight"], torch.zeros(1, c, 1, 1))
    assert torch.equal(sd["sbias"], torch.ones(1, c, 1, 1))
    assert torch.equal(sd["gn.weight"], torch.ones(c)) and torch.equal(sd["gn.bias"], torch.zeros(c))
    assert m.gn.eps == 1e-5 and m.gn.num_groups == c and m.gn.num_channels == c
    assert sum(p.numel() for p in m.parameters()) == 3 * channels // groups
    # The authors' layer loads unchanged (strict).
    AuthorsSA(channels, groups).load_state_dict(sd)


def test_device_and_dtype_arguments():
    m = ShuffleAttention(16, 2, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in m.parameters())
    meta = ShuffleAttention(16, 2, device="meta")
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize("impl", IMPLS)
def test_initial_gate_is_sigmoid_one(impl):
    """At init every gate is sigmoid(1): out = shuffle(x) * sigmoid(1)."""
    require_fused(impl)
    C = 64
    m = ShuffleAttention(C, 8, impl=impl)
    x = torch.randn(2, C, 5, 7)
    expected = x[:, shuffle_index(C)] * torch.sigmoid(torch.tensor(1.0))
    assert rel_err(m(x), expected) <= FP32_TOL


def test_reset_parameters_restores_initial_values():
    m = randomize_sa_(ShuffleAttention(32, 4))
    m.reset_parameters()
    fresh = ShuffleAttention(32, 4)
    for (name, a), b in zip(m.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- equivalence, every impl
CASES = [  # (channels, groups, input shape)
    pytest.param(8, 1, (2, 8, 5, 7), id="G1-odd"),
    pytest.param(64, 8, (1, 64, 7, 9), id="G8-batch1-odd"),
    pytest.param(256, 64, (2, 256, 3, 5), id="G64"),
    pytest.param(128, 64, (2, 128, 3, 3), id="G64-c1"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels,groups,shape", CASES)
def test_matches_reference_forward_and_all_gradients(impl, channels, groups, shape):
    module, ref = make_pair(channels, groups, impl)
    check_against(module, ref, ref_params_of(ref), torch.randn(shape))


@pytest.mark.parametrize("impl", IMPLS)
def test_single_pixel_planes(impl):
    """H = W = 1 (e.g. the last stage of an SA-ResNet at 32x32): GroupNorm sees zero variance
    and its output is exactly gn.bias. In fp32 the authors' formulation rounds badly here
    (GroupNorm divides rounding noise by sqrt(eps)), so the per-channel forms are judged
    against the fp64 statement; they centre before scaling, A * (x - mean) + B, which keeps
    them exact. The exact gradient of gn.weight is 0 (it multiplies x - mean = 0)."""
    module, ref = make_pair(128, 64, impl)
    x = torch.randn(2, 128, 1, 1)
    if impl == "reference":  # the same formulation in fp32 on both sides
        check_against(module, ref, ref_params_of(ref), x, zero_grads=("gn.weight",))
        return
    ref64 = ref.double()
    check_against(module, lambda t: ref64(t.double()), ref_params_of(ref64), x, tol=FP32_TOL,
                  zero_grads=("gn.weight",))


@pytest.mark.parametrize("impl", IMPLS)
def test_one_value_per_group(impl):
    """G = 1, one sample, 1x1 planes: GroupNorm sees one value per group. nn.GroupNorm
    refuses that input; the formula is defined (the value normalises to 0), and every impl
    computes it, so "auto" without a kernel (which runs the reference) works there too."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(4, 1, impl=impl))
    x = torch.randn(1, 4, 1, 1, requires_grad=True)
    y = module(x)
    y.sum().backward()
    x0, x1 = x.detach()[0, :2, 0, 0], x.detach()[0, 2:, 0, 0]
    p = {n: t.detach().reshape(-1) for n, t in module.named_parameters()}
    want = torch.empty(4)
    want[0::2] = x0 * torch.sigmoid(p["cweight"] * x0 + p["cbias"])           # channel branch
    want[1::2] = x1 * torch.sigmoid(p["sweight"] * p["gn.bias"] + p["sbias"])  # spatial: gn(x1) = gn.bias
    torch.testing.assert_close(y.detach().reshape(-1), want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_channels_last_input(impl):
    module, ref = make_pair(64, 8, impl)
    x = torch.randn(2, 64, 5, 7).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    check_against(module, ref, ref_params_of(ref), x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, layout", [((2, 64, 5, 7), torch.channels_last),
                                           ((2, 64, 3, 4, 5), torch.channels_last_3d)])
def test_channels_last_output(impl, shape, layout):
    """Every impl hands a channels_last network its layout back, its gradient too (the
    authors' reshapes give NCHW), with the same values as on NCHW input."""
    module = randomize_sa_(ShuffleAttention(64, 8, impl=impl))
    x = torch.randn(shape)
    x_cl = x.to(memory_format=layout).requires_grad_()
    y_cl = module(x_cl)
    assert y_cl.is_contiguous(memory_format=layout) and not y_cl.is_contiguous()
    grad_out = torch.randn(shape)
    y_cl.backward(grad_out)
    assert x_cl.grad.is_contiguous(memory_format=layout)
    x_nchw = x.clone().requires_grad_()
    y = module(x_nchw)
    y.backward(grad_out)
    assert y.is_contiguous()
    assert rel_err(y_cl, y) <= FP32_TOL and rel_err(x_cl.grad, x_nchw.grad) <= FP32_TOL


@pytest.mark.parametrize("impl", ["auto", "torch", "reference"])
def test_channels_last_output_under_cpu_autocast(impl):
    """CPU bf16 has no fused kernel: the PyTorch-op path keeps the layout too."""
    module = ShuffleAttention(64, 8, impl=impl)
    x = torch.randn(2, 64, 5, 7).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        y = module(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_input(impl):
    module, ref = make_pair(32, 4, impl)
    base = torch.randn(2, 9, 32, 10, requires_grad=True)
    x = base.permute(0, 2, 1, 3)[..., ::2]  # (2, 32, 9, 5), strided
    assert not x.is_contiguous()
    grad_out = torch.randn(x.shape)
    out = module(x)
    gx, = torch.autograd.grad(out, base, grad_out)
    x_ref = x.detach().contiguous().requires_grad_()
    out_ref = ref(x_ref)
    gx_ref, = torch.autograd.grad(out_ref, x_ref, grad_out)
    assert rel_err(out, out_ref) <= FP32_TOL
    assert rel_err(gx.permute(0, 2, 1, 3)[..., ::2], gx_ref) <= FP32_TOL
    assert torch.all(gx.permute(0, 2, 1, 3)[..., 1::2] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 32, 11), (1, 32, 9), (2, 32, 3, 5, 7), (1, 32, 1, 3, 3)],
                         ids=["1d", "1d-batch1", "3d", "3d-batch1"])
def test_1d_and_3d_inputs(impl, shape):
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(32, 4, impl=impl))
    params = [dict(module.named_parameters())[n] for n in SA_PARAM_NAMES]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    named = dict(zip(SA_PARAM_NAMES, ref_params))
    check_against(module, lambda x: authors_sa_nd(x, named, 4), ref_params, torch.randn(shape))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 32, 4, 4), (0, 32, 9), (0, 32, 2, 3, 3)], ids=["2d", "1d", "3d"])
def test_empty_batch(impl, shape):
    require_fused(impl)
    x = torch.randn(shape, requires_grad=True)
    module = ShuffleAttention(32, 4, impl=impl)
    y = module(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


EMPTY_PLANES = [(2, 32, 0, 4), (2, 32, 4, 0), (2, 32, 0), (2, 32, 2, 0, 3), (0, 32, 0, 3)]


def _empty_output_zero_grads(fn, module, shape, dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = fn(x)
    y.sum().backward()
    assert y.shape == x.shape and y.dtype == x.dtype and x.grad.shape == x.shape
    for name, p in module.named_parameters():  # zero, as from the fused kernels: not NaN, not None
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", EMPTY_PLANES, ids=["2d-h0", "2d-w0", "1d", "3d", "batch0"])
def test_planes_without_pixels(impl, shape):
    """Every impl agrees on planes of no pixels: an empty output and zero parameter gradients
    (the authors' GroupNorm refuses them; the per-channel form's mean was NaN)."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(32, 4, impl=impl))
    _empty_output_zero_grads(module, module, shape)


@pytest.mark.parametrize("form", ["reference", "torch", "script", "fx", "bf16", "gn-hook"])
def test_planes_without_pixels_other_paths(form):
    """The functional forms and the paths that run them: TorchScript, torch.fx, bf16 on CPU
    ("auto" falls back to the reference) and a hook on gn (no call on empty planes)."""
    module = randomize_sa_(ShuffleAttention(32, 4, impl="torch" if form in ("script", "fx") else "auto"))
    fn, dtype = module, torch.float32
    if form in ("reference", "torch"):
        f = getattr(sanet.layers, f"shuffle_attention_{form}")
        params = [dict(module.named_parameters())[n] for n in SA_PARAM_NAMES]
        fn = lambda x: f(x, *params, 4, module.gn.eps)  # noqa: E731
    elif form == "script":
        fn = torch.jit.script(module)
    elif form == "fx":
        fn = torch.fx.symbolic_trace(module)
    elif form == "bf16":
        module, dtype = module.bfloat16(), torch.bfloat16
        fn = module
    else:
        calls = []
        module.gn.register_forward_hook(lambda *a: calls.append(1))
    for shape in EMPTY_PLANES:
        module.zero_grad()
        _empty_output_zero_grads(fn, module, shape, dtype)
    if form == "gn-hook":
        assert calls == []


@pytest.mark.parametrize("impl", ["reference", "torch", "fused"])
def test_gradcheck_fp64(impl):
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(8, 2, impl=impl).double())
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp64_matches_reference(impl):
    module, ref = make_pair(32, 4, impl, dtype=torch.float64)
    check_against(module, ref, ref_params_of(ref), torch.randn(2, 32, 5, 3, dtype=torch.float64), tol=1e-12)


# --------------------------------------------------------------------------- the tests can fail
def _mutant_weight_as_bias(x, p, g):  # the most copied re-implementation's bug
    return authors_sa_nd(x, dict(p, cbias=p["cweight"]), g)


def _mutant_no_shuffle(x, p, g):
    out = authors_sa_nd(x, p, g)
    inverse = torch.argsort(torch.tensor(shuffle_index(x.shape[1])))
    return out[:, inverse]


def _mutant_unbiased_variance(x, p, g):
    n = x[0, 0].numel()
    return authors_sa_nd(x, dict(p, **{"gn.weight": p["gn.weight"] * math.sqrt((n - 1) / n)}), g)


def _mutant_swapped_branches(x, p, g):
    b, C = x.shape[:2]
    xs = x.reshape(b, g, 2, C // (2 * g), -1).flip(2).reshape(x.shape)
    return authors_sa_nd(xs, p, g)


@pytest.mark.parametrize("mutant", [_mutant_weight_as_bias, _mutant_no_shuffle,
                                    _mutant_unbiased_variance, _mutant_swapped_branches],
                         ids=lambda f: f.__name__[8:])
def test_known_bugs_exceed_tolerance(mutant):
    """Variants with known bugs differ from the module by far more than the tolerance used above."""
    module = randomize_sa_(ShuffleAttention(64, 8, impl="torch"))
    p = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(2, 64, 5, 7)
    assert rel_err(mutant(x, p, 8), module(x)) > 100 * FP32_TOL


def test_zero_bias_init_fails_the_init_check():
    x = torch.randn(2, 16, 3, 3)
    m = ShuffleAttention(16, 2)
    p = {k: v.detach() for k, v in m.named_parameters()}
    zero_bias = authors_sa_nd(x, dict(p, cbias=p["cbias"] * 0, sbias=p["sbias"] * 0), 2)
    expected = x[:, shuffle_index(16)] * torch.sigmoid(torch.tensor(1.0))
    assert rel_err(m(x), expected) <= FP32_TOL < rel_err(zero_bias, expected)


# --------------------------------------------------------------------------- autocast
HALF = [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)]  # unit roundoff


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
@pytest.mark.parametrize("dtype,u", HALF, ids=["bf16", "fp16"])
def test_autocast_half_statistics_in_fp32(impl, dtype, u):
    """Output in the input dtype and within one rounding of the exact result on the same
    (rounded) input, which a computation in half precision misses by several ulps."""
    module = randomize_sa_(ShuffleAttention(64, 8, impl=impl))
    p = {k: v.detach().double() for k, v in module.named_parameters()}
    x = (torch.randn(2, 64, 16, 16) * 3 + 1).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = module(x)
    assert out.dtype == dtype and out.shape == x.shape
    exact = authors_sa_nd(x.double(), p, 8)
    ulps = ((out.double() - exact).abs() / (2 * u * exact.abs() + 1e-12)).max().item()
    assert ulps <= 1.0, f"{ulps:.2f} ulps from the exact result"
    # Negative control: the same steps computed in half precision are several ulps off.
    native = authors_sa_nd(x, {k: v.to(dtype) for k, v in p.items()}, 8)
    assert ((native.double() - exact).abs() / (2 * u * exact.abs() + 1e-12)).max().item() > 1.0
    # and gradients flow in the input dtype
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        module(xg).float().square().sum().backward()
    assert xg.grad.dtype == dtype and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
def test_low_precision_parameters_with_fp32_input(impl):
    """A bf16 layer (module.bfloat16()) on fp32 input computes in fp32: its parameters are
    exact in fp32, and products of two of them must not round to bf16 first ("torch" did)."""
    module = randomize_sa_(ShuffleAttention(16, 2, impl=impl)).bfloat16()
    x = torch.randn(2, 16, 5, 5)
    p = {k: v.detach().double() for k, v in module.named_parameters()}
    exact = authors_sa_nd(x.double(), p, 2)
    with torch.no_grad():
        out = module(x)
    assert out.dtype == torch.float32 and rel_err(out.double(), exact) <= FP32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_parameter_gradients_in_each_parameters_own_dtype(impl):
    """fp16 gates beside an fp32 GroupNorm (norm layers kept in fp32), fp32 input: each
    parameter's gradient is computed in fp32 and rounded once to its own dtype. The kernels
    returned all six in cweight's dtype: gn.weight's gradient (~2e5 here) became inf."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(16, 2, impl=impl))
    with torch.no_grad():
        module.sweight.fill_(1.0)
    module.half()
    module.gn.float()
    x = torch.randn(8, 16, 32, 32) * 100
    module(x).sum().backward()
    p = {k: v.detach().double().requires_grad_(True) for k, v in module.named_parameters()}
    exact = torch.autograd.grad(authors_sa_nd(x.double(), p, 2).sum(), list(p.values()))
    for (name, param), want in zip(module.named_parameters(), exact):
        got = param.grad
        assert got.dtype == param.dtype, name
        if param.dtype == torch.float32:
            assert rel_err(got.double(), want) <= FP32_TOL, (name, got, want)
            continue
        # fp16 gates: the exact gradient rounded once (inf where it is past fp16's range)
        finite = want.half().isfinite()
        assert torch.equal(got.isfinite(), finite), (name, got, want)
        assert rel_err(got[finite].double(), want[finite]) <= 1e-3, (name, got, want)
    assert module.gn.weight.grad.abs().max() > 65504  # past fp16's range: the case that broke


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_fp32_input_stays_fp32(impl):
    module, ref = make_pair(64, 8, impl)
    x = torch.randn(2, 64, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.float32
    assert rel_err(out, ref(x)) <= FP32_TOL


def test_fused_without_a_kernel_for_the_device_says_so():
    """impl='fused' means the kernel or an error ('auto' falls back): kernels exist for CPU
    (every float dtype) and CUDA, not for e.g. the meta device."""
    m = ShuffleAttention(16, 2, impl="fused").to("meta")
    with pytest.raises(RuntimeError, match=r"no fused kernel for meta torch.float32 input \(fused kernels exist "
                                           r"for CPU and CUDA\); use impl='auto'"):
        m(torch.randn(1, 16, 3, 3, device="meta"))


def test_fused_without_the_extension_says_why_it_is_not_loaded():
    """SANET_DISABLE_EXT=1 (or a failed build): the error names the reason, not only "needs
    the C++ extension"."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch, sanet\n"
            "try:\n"
            "    sanet.ShuffleAttention(16, 2, impl='fused')(torch.randn(1, 16, 3, 3))\n"
            "except sanet.SanetError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, SANET_DISABLE_EXT="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "no fused kernel for cpu torch.float32 input: the C++ extension is not loaded (disabled by " \
           "SANET_DISABLE_EXT); use impl='auto'" in out


# --------------------------------------------------------------------------- script, fx, compile
@pytest.mark.parametrize("impl", IMPLS)
def test_torchscript_equals_eager(impl):
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(32, 4, impl=impl))
    scripted = torch.jit.script(module)
    for shape in [(2, 32, 5, 7), (2, 32, 9), (1, 32, 2, 3, 5)]:
        x = torch.randn(shape)
        assert rel_err(scripted(x), module(x)) <= FP32_TOL
    with pytest.raises(Exception, match="built for 32 channels"):
        scripted(torch.randn(2, 16, 4, 4))


@pytest.mark.parametrize("impl", IMPLS)
def test_fx_symbolic_trace_equals_eager(impl):
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(32, 4, impl=impl))
    traced = torch.fx.symbolic_trace(module)
    targets = {str(n.target) for n in traced.graph.nodes}
    assert not any("sanet" in t and "sa_forward" in t for t in targets)  # plain PyTorch ops
    for shape in [(2, 32, 5, 7), (2, 32, 9), (1, 32, 2, 3, 5)]:
        x = torch.randn(shape)
        assert rel_err(traced(x), module(x)) <= FP32_TOL
    with pytest.raises(ValueError, match="built for 32 channels"):
        traced(torch.randn(2, 16, 4, 4))


@pytest.mark.slow  # ~25 s on 2 cores with a cold inductor cache, a few s warm
def test_torch_compile_forward_and_backward():
    """impl='auto' under torch.compile (inductor, one graph): the fused op is a graph node."""
    module = randomize_sa_(ShuffleAttention(32, 4))
    ref = AuthorsSA(32, 4)
    ref.load_state_dict(module.state_dict())
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 32, 5, 7, requires_grad=True)
    out = compiled(x)
    g = torch.randn(out.shape)
    gx, = torch.autograd.grad(out, x, g)
    x_ref = x.detach().requires_grad_()
    out_ref = ref(x_ref)
    gx_ref, = torch.autograd.grad(out_ref, x_ref, g)
    assert rel_err(out, out_ref) <= FP32_TOL and rel_err(gx, gx_ref) <= FP32_TOL


# --------------------------------------------------------------------------- misc API
def test_public_api_and_repr():
    assert sanet.ShuffleAttention is ShuffleAttention
    m = ShuffleAttention(64, 8, impl="torch")
    assert "64, groups=8, impl='torch'" in repr(m)
    assert set(sanet.layers.SA_IMPLS) == set(IMPLS)
