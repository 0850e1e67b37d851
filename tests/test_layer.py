"""ShuffleAttention against a step-by-step statement of SA-NET.md section 1.

The reference below is written in this file, independently of sanet's code, the way the
authors' ``sa_layer`` computes it on 4-D input: view (N*G, C/G, H, W), chunk into two halves,
average pool + per-channel affine + sigmoid gate on the first, GroupNorm(c, c) + affine +
sigmoid gate on the second, concatenate, 2-group channel shuffle by a 5-D view/transpose.
Every ``impl`` of the module is checked against it (output, input gradient and the
gradient of all six parameters) with random parameter values.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

import sanet
from sanet import ShuffleAttention

from conftest import SA_PARAM_NAMES, randomize_sa_, rel_err, require_fused

IMPLS = ("reference", "torch", "fused", "auto")
FP32_TOL = 1e-5  # norm-wise relative error


# --------------------------------------------------------------------------- the reference
class AuthorsSA(nn.Module):
    """SA-NET.md section 1, one step per line, for (N, C, H, W) input."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        c = channels // (2 * groups)
        self.cweight = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, c, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, c, 1, 1))
        self.gn = nn.GroupNorm(c, c)  # eps 1e-5, weight 1, bias 0
        self.avg_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        b, ch, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)        # 1. (N*G, C/G, H, W)
        x_0, x_1 = x.chunk(2, dim=1)                     #    two halves of c channels
        xn = self.avg_pool(x_0)                          # 2. channel branch
        xn = self.cweight * xn + self.cbias
        xn = x_0 * torch.sigmoid(xn)
        xs = self.gn(x_1)                                # 3. spatial branch
        xs = self.sweight * xs + self.sbias
        xs = x_1 * torch.sigmoid(xs)
        out = torch.cat([xn, xs], dim=1)                 # 4. concatenate, back to (N, C, H, W)
        out = out.reshape(b, -1, h, w)
        out = out.reshape(b, 2, -1, h, w)                # 5. shuffle: (N, 2, C/2, H, W),
        out = out.permute(0, 2, 1, 3, 4)                 #    swap axes 1 and 2, flatten
        return out.reshape(b, -1, h, w)


def authors_sa_nd(x: Tensor, p: Dict[str, Tensor], groups: int) -> Tensor:
    """The same steps for any number of spatial dims (1-D, 2-D, 3-D): the average pool
    becomes a mean over all spatial dims and GroupNorm(c, c) is rank-agnostic."""
    b, ch, spatial = x.shape[0], x.shape[1], x.shape[2:]
    c = ch // (2 * groups)
    bcast = (1, c) + (1,) * len(spatial)
    dims = tuple(range(2, x.dim()))
    xg = x.reshape(b * groups, -1, *spatial)
    x_0, x_1 = xg.chunk(2, dim=1)
    xn = p["cweight"].reshape(bcast) * x_0.mean(dims, keepdim=True) + p["cbias"].reshape(bcast)
    xn = x_0 * torch.sigmoid(xn)
    xs = F.group_norm(x_1, c, p["gn.weight"], p["gn.bias"], 1e-5)
    xs = p["sweight"].reshape(bcast) * xs + p["sbias"].reshape(bcast)
    xs = x_1 * torch.sigmoid(xs)
    out = torch.cat([xn, xs], dim=1).reshape(b, ch, *spatial)
    out = out.reshape(b, 2, ch // 2, *spatial).transpose(1, 2)
    return out.reshape(b, ch, *spatial)


def shuffle_index(channels: int) -> list:
    """out[:, 2k + i] = y[:, i * C/2 + k]."""
    half = channels // 2
    return [i * half + k for k in range(half) for i in range(2)]


# --------------------------------------------------------------------------- helpers
def make_pair(channels: int, groups: int, impl: str, dtype=torch.float32) -> Tuple[ShuffleAttention, AuthorsSA]:
    """The module with random parameters and the reference holding the same values."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(channels, groups, impl=impl)).to(dtype)
    ref = AuthorsSA(channels, groups).to(dtype)
    ref.load_state_dict(module.state_dict())  # strict: the authors' names and shapes
    return module, ref


def run_fwd_bwd(fn, x: Tensor, params, grad_out: Tensor):
    out = fn(x)
    grads = torch.autograd.grad(out, (x, *params), grad_out)
    return out, grads


def check_against(module: nn.Module, ref_fn, ref_params, x: Tensor, tol: float = FP32_TOL,
                  zero_grads: Tuple[str, ...] = ()) -> None:
    """Output, d/dx and d/d(every parameter) of ``module`` equal those of ``ref_fn``.

    ``zero_grads``: parameters whose exact gradient is 0, where a relative error means
    nothing; their gradient must be below ``tol`` times the size of the incoming gradient.
    """
    x_ref = x.detach().contiguous().requires_grad_()
    x_mod = x.detach().requires_grad_()  # keeps x's strides (channels_last stays channels_last)
    grad_out = torch.randn(x.shape, dtype=x.dtype)
    mod_params = [dict(module.named_parameters())[n] for n in SA_PARAM_NAMES]
    out, g_mod = run_fwd_bwd(module, x_mod, mod_params, grad_out)
    out_ref, g_ref = run_fwd_bwd(ref_fn, x_ref, ref_params, grad_out)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, out_ref) <= tol, f"output: rel err {rel_err(out, out_ref):.3g}"
    for name, a, b in zip(("input",) + SA_PARAM_NAMES, g_mod, g_ref):
        if name in zero_grads:
            assert a.norm() <= tol * grad_out.norm() and b.norm() <= tol * grad_out.norm(), name
            continue
        err = rel_err(a, b)
        assert err <= tol, f"grad of {name}: rel err {err:.3g}"


def ref_params_of(ref: AuthorsSA):
    return [dict(ref.named_parameters())[n] for n in SA_PARAM_NAMES]


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


# --------------------------------------------------------------------------- errors
def test_construction_error_bad_impl():
    with pytest.raises(ValueError, match=r"impl must be one of .*'auto'.*got 'cuda'"):
        ShuffleAttention(16, 2, impl="cuda")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 16), (16,), (1, 2, 16, 2, 2, 2)])
def test_call_error_wrong_rank(impl, shape):
    require_fused(impl)
    m = ShuffleAttention(16, 2, impl=impl)
    with pytest.raises(ValueError) as info:
        m(torch.randn(shape))
    msg = str(info.value)
    assert "(N, C, L)" in msg and "(N, C, H, W)" in msg and "(N, C, D, H, W)" in msg
    assert f"{len(shape)}-D input of shape {list(shape)}" in msg


@pytest.mark.parametrize("impl", IMPLS)
def test_call_error_wrong_channels(impl):
    require_fused(impl)
    m = ShuffleAttention(16, 2, impl=impl)
    with pytest.raises(ValueError, match=r"built for 16 channels but the input has 32"):
        m(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match=r"built for 16 channels but the input has 4"):
        m(torch.randn(2, 4, 16, 16))  # a channels-last-shaped tensor (N, H, W, C) mistake


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_call_error_integer_input(impl, dtype):
    """Integer input used to fail inside mean() ("could not infer output dtype")."""
    require_fused(impl)
    m = ShuffleAttention(16, 2, impl=impl)
    x = torch.randint(0, 2, (2, 16, 4, 4)).to(dtype)
    with pytest.raises(TypeError, match=re.escape(
            "expects floating-point input (float32, float64, float16 or bfloat16; averages and "
            f"gates need fractions), got {dtype}: convert it first, e.g. x.float()")):
        m(x)


def test_call_error_integer_input_torchscript():
    scripted = torch.jit.script(ShuffleAttention(16, 2))
    with pytest.raises(Exception, match=r"expects floating-point input \(float32"):
        scripted(torch.randint(0, 5, (2, 16, 4, 4)))


# --------------------------------------------------------------------------- functional forms: errors
FUNCTIONALS = [sanet.shuffle_attention_reference, sanet.shuffle_attention_torch]
FN_IDS = ["reference", "torch"]
FN_PARAM_NAMES = ("cweight", "cbias", "sweight", "sbias", "gn_weight", "gn_bias")


def _params(channels: int, groups: int):
    return [p.detach() for p in randomize_sa_(ShuffleAttention(channels, groups)).parameters()]


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FN_IDS)
def test_functional_error_groups_do_not_divide_channels(fn):
    """C = 96, G = 32: the reference used to regroup silently, the torch form to fail in reshape."""
    params = [torch.ones(1, 1, 1, 1)] * 6  # 96 // 64 = 1 value each
    with pytest.raises(ValueError, match=re.escape(
            "channels (96) must be divisible by 2 * groups (2 * 32 = 64); valid groups for 96 "
            "channels: [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]")):
        fn(torch.randn(2, 96, 4, 4), *params, 32)


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FN_IDS)
@pytest.mark.parametrize("groups", [0, -4, 2.5, "4", True])
def test_functional_error_bad_groups(fn, groups):
    with pytest.raises(ValueError, match="groups must be a positive int"):
        fn(torch.randn(2, 32, 4, 4), *_params(32, 4), groups)


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FN_IDS)
@pytest.mark.parametrize("bad", range(6), ids=FN_PARAM_NAMES)
@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (3,), ()], ids=["2c", "c-1", "scalar"])
def test_functional_error_wrong_parameter_size(fn, bad, shape):
    """Wrong gate parameters used to give raw reshape or broadcast errors (or none)."""
    params = _params(32, 4)  # c = 4
    params[bad] = torch.ones(shape)
    with pytest.raises(ValueError, match=re.escape(
            f"{fn.__name__}: {FN_PARAM_NAMES[bad]} must hold C / (2 * groups) = 32 / (2 * 4) = 4 "
            f"values (shape (1, 4, 1, 1) or (4,)), got shape {list(shape)}")):
        fn(torch.randn(2, 32, 4, 4), *params, 4)


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FN_IDS)
def test_functional_error_input(fn):
    with pytest.raises(TypeError, match="floating-point input"):
        fn(torch.ones(2, 32, 4, 4, dtype=torch.int32), *_params(32, 4), 4)
    with pytest.raises(ValueError, match=r"got 2-D input of shape \[2, 32\]"):
        fn(torch.randn(2, 32), *_params(32, 4), 4)


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FN_IDS)
def test_functional_accepts_flat_parameters_and_numpy_groups(fn):
    np = pytest.importorskip("numpy")
    params = _params(32, 4)
    x = torch.randn(2, 32, 5, 3)
    expect = fn(x, *params, 4)
    assert rel_err(fn(x, *[p.reshape(-1) for p in params], 4), expect) <= 1e-6
    assert rel_err(fn(x, *params, np.int64(4)), expect) <= 1e-6


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FN_IDS)
def test_functional_checks_keep_graph_capture_working(fn):
    """The checks run in eager mode and fx graphs, are skipped by TorchScript and jit.trace,
    and don't break torch.compile's graph (fullgraph)."""
    params = _params(32, 4)
    x = torch.randn(2, 32, 5, 3)
    expect = fn(x, *params, 4)
    scripted = torch.jit.script(fn)
    assert rel_err(scripted(x, *params, 4), expect) <= FP32_TOL

    class Wrap(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return fn(x, *params, 4)

    traced = torch.fx.symbolic_trace(Wrap())
    assert rel_err(traced(x), expect) <= FP32_TOL
    with pytest.raises(ValueError, match=r"channels \(36\) must be divisible"):
        traced(torch.randn(2, 36, 4, 4))  # the check is a node of the fx graph
    compiled = torch.compile(Wrap(), backend="eager", fullgraph=True)
    assert rel_err(compiled(x), expect) <= FP32_TOL
    exported = torch.export.export(Wrap(), (x,))
    assert rel_err(exported.module()(x), expect) <= FP32_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # the check is skipped, not traced
        warnings.filterwarnings("ignore", category=FutureWarning)  # trace's deprecation
        jit_traced = torch.jit.trace(Wrap(), x)
    assert rel_err(jit_traced(x), expect) <= FP32_TOL


# --------------------------------------------------------------------------- hooks on gn
@pytest.mark.parametrize("impl", IMPLS)
def test_gn_forward_hooks_run_and_their_output_counts(impl):
    """Every impl reads gn's parameters without calling gn; with hooks on gn, SA calls it as
    the authors' code does, so the hooks fire on the authors' (N*G, c, H, W) view and a hook
    that changes gn's output changes SA's as in the authors' code."""
    module, ref = make_pair(64, 8, impl)
    seen = []

    def pre_hook(m, args):
        seen.append(("pre", tuple(args[0].shape)))

    def hook(m, args, out):
        seen.append(("post", tuple(out.shape)))
        return out * 2 + 1

    for m in (module.gn, ref.gn):
        m.register_forward_pre_hook(pre_hook)
        m.register_forward_hook(hook)
    check_against(module, ref, ref_params_of(ref), torch.randn(2, 64, 5, 7))
    assert seen == [("pre", (16, 4, 5, 7)), ("post", (16, 4, 5, 7))] * 2  # module, then ref


@pytest.mark.parametrize("shape", [(2, 32, 11), (1, 32, 2, 3, 5), (0, 32, 3, 3)], ids=["1d", "3d", "empty"])
def test_gn_hook_other_ranks(shape):
    module = randomize_sa_(ShuffleAttention(32, 4))
    seen = []
    module.gn.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    p = {n: t.detach() for n, t in module.named_parameters()}
    x = torch.randn(shape)
    y = module(x)
    assert y.shape == x.shape
    if x.numel():  # the test's reference can't view an empty batch
        torch.testing.assert_close(y, authors_sa_nd(x, p, 4), rtol=1e-5, atol=1e-6)
    assert seen == [(shape[0] * 4, 4) + shape[2:]]


def test_gn_hook_and_planes_without_pixels():
    """nn.GroupNorm refuses planes without pixels; the layer without hooks returns the empty
    output. A hook on gn changes nothing there (gn is not called: there is nothing to see)."""
    module = randomize_sa_(ShuffleAttention(32, 4))
    seen = []
    module.gn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 32, 0, 5, requires_grad=True)
    y = module(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and seen == []


@pytest.mark.parametrize("impl", IMPLS)
def test_global_forward_hook_sees_gn(impl):
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(32, 4, impl=impl))
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        module(torch.randn(2, 32, 3, 3))
    finally:
        handle.remove()
    assert seen == ["GroupNorm", "ShuffleAttention"]


@pytest.mark.parametrize("impl", IMPLS)
def test_prune_gn_weight_then_train(impl):
    """prune recomputes gn.weight in a forward pre-hook of gn. When gn was never called, the
    second SGD step backpropagated through the freed graph of the weight computed at prune time."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(32, 4, impl=impl))
    prune.l1_unstructured(module.gn, "weight", amount=0.5)
    x = torch.randn(2, 32, 5, 7)
    ref = AuthorsSA(32, 4)
    with torch.no_grad():
        sd = {n: t.detach() for n, t in module.named_parameters() if not n.startswith("gn.")}
        ref.load_state_dict(dict(sd, **{"gn.weight": module.gn.weight_orig * module.gn.weight_mask,
                                        "gn.bias": module.gn.bias}))
    assert rel_err(module(x), ref(x)) <= FP32_TOL  # the pruned weight is the one used
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        module(x).square().mean().backward()
        opt.step()
    grad = module.gn.weight_orig.grad
    assert grad is not None and torch.all(grad[module.gn.weight_mask == 0] == 0)


def test_gn_hook_torchscript_and_fx():
    """TorchScript keeps its path (gn's parameters read directly); fx records gn as a module
    call, so the GraphModule runs gn's hooks."""
    module = randomize_sa_(ShuffleAttention(32, 4))
    x = torch.randn(2, 32, 5, 7)
    expect = module(x)
    assert rel_err(torch.jit.script(module)(x), expect) <= FP32_TOL
    seen = []
    module.gn.register_forward_hook(lambda m, i, o: seen.append(1))
    traced = torch.fx.symbolic_trace(module)
    assert "gn" in {n.target for n in traced.graph.nodes if n.op == "call_module"}
    seen.clear()
    assert rel_err(traced(x), expect) <= FP32_TOL and seen == [1]


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


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_fp32_input_stays_fp32(impl):
    module, ref = make_pair(64, 8, impl)
    x = torch.randn(2, 64, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.float32
    assert rel_err(out, ref(x)) <= FP32_TOL


def test_fused_rejects_half_on_cpu_with_a_clear_error():
    """impl='fused' means the kernel or an error; the CPU kernel is fp32/fp64 ('auto' falls back)."""
    require_fused("fused")
    m = ShuffleAttention(16, 2, impl="fused")
    with pytest.raises(RuntimeError, match=r"no fused kernel for cpu torch.bfloat16 .*impl='auto'"):
        m(torch.randn(1, 16, 3, 3, dtype=torch.bfloat16))


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
