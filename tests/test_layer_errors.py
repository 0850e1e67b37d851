"""ShuffleAttention and its functional forms refuse bad input with errors that say what was
wrong and what is valid: rank, channel count, dtype, group count, parameter sizes."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import sanet
from sanet import ShuffleAttention

from conftest import randomize_sa_, rel_err, require_fused
from sa_reference import FP32_TOL, IMPLS


# --------------------------------------------------------------------------- errors
def test_construction_error_bad_impl():
    with pytest.raises(ValueError, match=r"impl must be one of .*'auto'.*got 'cuda'"):
        ShuffleAttention(16, 2, impl="cuda")
    m = ShuffleAttention(16, 2)
    m.impl = "Torch"  # set later: the call says so (it was a bare KeyError)
    with pytest.raises(ValueError, match=r"impl must be one of .*'torch'.*got 'Torch'"):
        m(torch.randn(2, 16, 3, 3))


@pytest.mark.parametrize("eps", [-1e-5, 0, 0.0, float("nan"), float("inf"), True, "1e-5", None])
def test_construction_error_bad_eps(eps):
    # eps <= 0 made constant planes NaN (rsqrt(0 + eps) is NaN or inf) instead of an error
    with pytest.raises(ValueError, match=r"eps must be a positive finite number .*got "):
        ShuffleAttention(16, 2, eps=eps)


def test_eps_accepts_numpy_and_int_as_float():
    np = pytest.importorskip("numpy")
    for eps in (np.float32(1e-3), 1):
        m = ShuffleAttention(16, 2, eps=eps)
        assert type(m.gn.eps) is float and m.gn.eps == pytest.approx(float(eps))


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [[torch.randn(2, 16, 4, 4)], None, np.zeros((2, 16, 4, 4), np.float32)],
                         ids=["list", "None", "ndarray"])
def test_call_error_not_a_tensor(impl, bad):
    """A list, None or NumPy array used to fail with "'list' object has no attribute 'dim'"."""
    require_fused(impl)
    with pytest.raises(TypeError, match=rf"ShuffleAttention expects a torch.Tensor, got {type(bad).__name__}"):
        ShuffleAttention(16, 2, impl=impl)(bad)


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
            f"{fn.__name__}: channels (96) must be divisible by 2 * groups (2 * 32 = 64); valid groups "
            "for 96 channels: [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]. sanet.fit_sa_groups(96, 32) picks the "
            "largest valid one.")):
        fn(torch.randn(2, 96, 4, 4), *params, 32)


@pytest.mark.parametrize("fn", FUNCTIONALS, ids=FN_IDS)
@pytest.mark.parametrize("groups", [0, -4, 2.5, "4", True])
def test_functional_error_bad_groups(fn, groups):
    with pytest.raises(ValueError, match=f"{fn.__name__}: groups must be a positive int"):
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
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf"), None])
def test_functional_error_bad_eps(fn, eps):
    """eps <= 0 gave NaN on constant planes without a word (the module refused it)."""
    with pytest.raises(ValueError, match=rf"{fn.__name__}: eps must be a positive finite number .*got "):
        fn(torch.randn(2, 32, 4, 4), *_params(32, 4), 4, eps)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, "float32"])
def test_construction_error_dtype_not_floating_point(dtype):
    """A complex layer crashed in the C++ kernel (or lost the imaginary part silently)."""
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype .* got "):
        ShuffleAttention(16, 2, dtype=dtype)


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


@pytest.mark.parametrize("groups, shape", [(0, (2, 16, 3)), (-2, (2, 16, 3)), (3, (2, 16, 3)),
                                           (2, (16,))])
def test_channel_shuffle_error_bad_groups(groups, shape):
    """groups=0 raised ZeroDivisionError, 3 for 16 channels a bare unflatten size error."""
    with pytest.raises(ValueError, match=re.escape(
            f"a positive divisor of C), got groups={groups} for shape {list(shape)}")):
        sanet.channel_shuffle(torch.randn(shape), groups)


@pytest.mark.parametrize("groups", [None, 2.0, True, "2"])
def test_channel_shuffle_error_groups_not_an_int(groups):
    with pytest.raises(TypeError, match=rf"channel_shuffle: groups must be an int, got {re.escape(repr(groups))}"):
        sanet.channel_shuffle(torch.randn(2, 16, 3), groups)


def test_channel_shuffle_is_the_shufflenet_permutation_in_graphs():
    x = torch.arange(12.0).reshape(1, 12, 1)
    expect = torch.tensor([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11.0]).reshape(1, 12, 1)
    assert torch.equal(sanet.channel_shuffle(x, 3), expect)
    assert torch.equal(torch.jit.script(sanet.channel_shuffle)(x, 3), expect)

    class Shuffle(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return sanet.channel_shuffle(x, 3)

    traced = torch.fx.symbolic_trace(Shuffle())
    assert torch.equal(traced(x), expect)
    with pytest.raises(ValueError, match="got groups=3 for shape"):
        traced(torch.randn(1, 10, 1))


# --------------------------------------------------------------------------- devices
# A CPU-only machine has one real device; parameters on "meta" stand in for "another device"
# (CUDA parameters with CPU input would have the C++ kernel read device pointers on the host).
@pytest.mark.parametrize("moved", ["all", "gn.bias"])
def test_parameters_on_another_device_auto_gives_pytorchs_device_error(moved):
    """The fused kernel is chosen only when the parameters are on x's device; elsewhere
    "auto" runs PyTorch ops, which name the devices (the kernel used to be chosen from x
    alone and fail with "data is not allocated yet", which points at torch.compile)."""
    m = ShuffleAttention(16, 2)
    if moved == "all":
        m.to("meta")
    else:
        m.gn.bias = nn.Parameter(m.gn.bias.detach().to("meta"))
    with pytest.raises(RuntimeError, match="device") as info:
        m(torch.randn(2, 16, 3, 3))
    assert "not allocated" not in str(info.value)
    assert not isinstance(info.value, sanet.SanetError)  # PyTorch's own error, not the fused op's check


@pytest.mark.parametrize("moved,name", [("all", "cweight"), ("gn.weight", "gn_weight"), ("sbias", "sbias"),
                                        ("cbias", "cbias"), ("gn.bias", "gn_bias")])
def test_parameters_on_another_device_fused_names_tensor_and_devices(moved, name):
    require_fused("fused")
    from sanet.ops import fused_sa_supported, shuffle_attention_fused

    m = ShuffleAttention(16, 2, impl="fused")
    if moved == "all":
        m.to("meta")
    else:
        owner, attr = (m.gn, moved[3:]) if moved.startswith("gn.") else (m, moved)
        setattr(owner, attr, nn.Parameter(getattr(owner, attr).detach().to("meta")))
    x = torch.randn(2, 16, 3, 3)
    expect = rf"{name} is on meta but the input x is on cpu; .*module\.to\('cpu'\) or x\.to\('meta'\)"
    with pytest.raises(sanet.SanetError, match=expect):
        m(x)
    params = (m.cweight, m.cbias, m.sweight, m.sbias, m.gn.weight, m.gn.bias)
    assert fused_sa_supported(x) and not fused_sa_supported(x, *params)
    with pytest.raises(sanet.SanetError, match=expect):  # the public functional entry
        shuffle_attention_fused(x, *params, 2)
    with pytest.raises(sanet.SanetError, match=expect):  # the registered op itself
        torch.ops.sanet.sa_forward(x, None, *params, 2, 1e-5, None, None, None, None, False, 1e-5, False)
    assert fused_sa_supported(x, *(torch.zeros_like(p, device="cpu") for p in params))


def test_fused_functional_form_checks_groups_and_parameter_sizes():
    require_fused("fused")
    from sanet.ops import shuffle_attention_fused

    x = torch.randn(2, 24, 3, 3)
    p = [torch.randn(1, 3, 1, 1) for _ in range(4)] + [torch.randn(3), torch.randn(3)]  # 24 / (2 * 4) = 3 each
    with pytest.raises(ValueError,
                       match=r"shuffle_attention_fused: .*valid groups for 24 channels: \[1, 2, 3, 4, 6, 12\]"):
        shuffle_attention_fused(x, *p, 5)
    for shape in ((24,), (2, 24), (1, 2, 24, 1, 1, 1)):  # (N, C) and 6-D broke double backward, torch.func
        with pytest.raises(ValueError, match=rf"got {len(shape)}-D input of shape"):
            shuffle_attention_fused(torch.randn(shape), *p, 4)
    with pytest.raises(TypeError, match="floating-point input"):
        shuffle_attention_fused(torch.ones(2, 24, 3, 3, dtype=torch.int32), *p, 4)
    with pytest.raises(ValueError, match=r"shuffle_attention_fused: eps must be a positive finite number"):
        shuffle_attention_fused(x, *p, 4, 0.0)
    with pytest.raises(ValueError, match=r"sbias must hold C / \(2 \* groups\) = 24 / \(2 \* 4\) = 3 values"):
        shuffle_attention_fused(x, *p[:3], torch.zeros(4), *p[4:], 4)
    ref = sanet.layers.shuffle_attention_reference(x, *p, 4)
    assert torch.allclose(shuffle_attention_fused(x, *p, 4), ref, atol=1e-5)
