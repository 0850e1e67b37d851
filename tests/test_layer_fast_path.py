"""The layer's short path for plain CPU inference (``sanet.ops.fused.eager_cpu_sa_inference``):
it gives the general path's result where it applies, and declines (returns None, so the
general dispatch decides) wherever anything besides the kernel must happen: autograd,
hooks, recording, transforms, another impl, parameters that are not plain."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sanet
from sanet.layers import shuffle_attention as sa_module
from sanet.ops import sa_op
from sanet.ops.fused import eager_cpu_sa_inference

from conftest import randomize_sa_, rel_err
from fused_utils import require_cpu_ext
from sa_reference import FP32_TOL, authors_sa_nd

require_cpu_ext()


def _layer(channels: int = 64, groups: int = 8, **kw) -> sanet.ShuffleAttention:
    return randomize_sa_(sanet.ShuffleAttention(channels, groups, **kw), torch.Generator().manual_seed(7)).eval()


def _exact(sa: nn.Module, x: torch.Tensor) -> torch.Tensor:
    p = {k: v.detach().double() for k, v in sa.named_parameters()}
    return authors_sa_nd(x.double(), p, sa.groups, sa.gn.eps)


@pytest.fixture
def spies(monkeypatch):
    """Counts the kernel's calls and the general dispatch's (its first question)."""
    calls = {"kernel": 0, "general": 0}
    kernel, needs = sa_op.KERNELS["cpu"][0], sa_module.needs_pytorch_ops

    def counted_kernel(*args):
        calls["kernel"] += 1
        return kernel(*args)

    def counted_needs():
        calls["general"] += 1
        return needs()

    monkeypatch.setitem(sa_op.KERNELS, "cpu", (counted_kernel, *sa_op.KERNELS["cpu"][1:]))
    monkeypatch.setattr(sa_module, "needs_pytorch_ops", counted_needs)
    return calls


_SHAPES = {"1d": (3, 64, 11), "2d": (2, 64, 7, 9), "3d": (2, 64, 3, 4, 5)}


@pytest.mark.parametrize("shape,layout", [
    pytest.param(_SHAPES[d], layout, id=f"{d}-{layout}") for d in _SHAPES
    for layout in ("contiguous", "strided") + (("channels_last",) if d != "1d" else ())])
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_plain_inference_takes_the_short_path(spies, layout, shape, impl):
    sa = _layer(impl=impl)
    x = torch.randn(shape[:-1] + (2 * shape[-1],), generator=torch.Generator().manual_seed(3))
    x = x[..., ::2] if layout == "strided" else x[..., : shape[-1]].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    with torch.no_grad():
        y = sa(x)
    assert spies == {"kernel": 1, "general": 0}
    assert rel_err(y, _exact(sa, x)) <= FP32_TOL
    assert y.stride() == torch.empty_like(x).stride()  # x's layout, as the general path returns it
    with torch.no_grad(), torch.inference_mode():
        torch.testing.assert_close(sa(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_kernel_dtypes_take_it_and_match_the_general_path(spies, dtype):
    sa = _layer().to(dtype)
    x = torch.randn(2, 64, 6, 5, dtype=dtype)
    with torch.no_grad():
        y = sa(x)
    assert spies["general"] == 0
    with torch.enable_grad():
        torch.testing.assert_close(y, sa(x).detach(), rtol=0, atol=0)  # autograd: the general path
    assert spies["general"] == 1


def _declines(sa: nn.Module, x: torch.Tensor) -> bool:
    return eager_cpu_sa_inference(x, sa) is None


def test_it_applies_to_a_plain_call():
    """The contrast for the cases below: the same layer and input, nothing else going on."""
    sa, x = _layer(), torch.randn(2, 64, 5, 5)
    with torch.no_grad():
        assert not _declines(sa, x)
    assert _declines(sa, x)  # autograd on


@contextlib.contextmanager
def _forward_ad():
    with torch.autograd.forward_ad.dual_level():
        yield


@contextlib.contextmanager
def _dispatch_mode():
    from sanet.analysis.memory import PeakMemoryTracker

    with PeakMemoryTracker():
        yield


@contextlib.contextmanager
def _functorch():
    # a transform level is active inside vmap: enter one around the check
    from torch._C._functorch import _vmap_increment_nesting, _vmap_decrement_nesting

    _vmap_increment_nesting(2, "error")
    try:
        yield
    finally:
        _vmap_decrement_nesting()


@pytest.mark.parametrize("context", [_forward_ad, _dispatch_mode, _functorch],
                         ids=["forward-ad", "dispatch-mode", "functorch"])
def test_it_declines_where_something_records_or_transforms(context):
    sa, x = _layer(), torch.randn(2, 64, 5, 5)
    with torch.no_grad(), context():
        assert _declines(sa, x)


@pytest.mark.parametrize("change", ["impl-torch", "impl-reference", "gn-hook", "global-hook", "parametrized",
                                    "gn-parametrized", "subclass-input", "int-input", "meta-parameter",
                                    "wrong-channels", "2-d-input", "6-d-input"])
def test_it_declines_what_the_general_path_must_handle(change):
    sa, x = _layer(), torch.randn(2, 64, 5, 5)
    handles = []
    if change.startswith("impl-"):
        sa.impl = change[5:]
    elif change == "gn-hook":
        handles.append(sa.gn.register_forward_hook(lambda *a: None))
    elif change == "global-hook":
        handles.append(nn.modules.module.register_module_forward_hook(lambda *a: None))
    elif change == "parametrized":
        parametrize.register_parametrization(sa, "cweight", nn.Identity())
    elif change == "gn-parametrized":
        parametrize.register_parametrization(sa.gn, "weight", nn.Identity())
    elif change == "subclass-input":
        x = nn.Parameter(x)
    elif change == "int-input":
        x = x.long()
    elif change == "wrong-channels":
        x = torch.randn(2, 32, 5, 5)
    elif change == "2-d-input":
        x = torch.randn(2, 64)
    elif change == "6-d-input":
        x = torch.randn(1, 64, 2, 2, 2, 2)
    elif change == "meta-parameter":
        sa.sbias = nn.Parameter(torch.empty_like(sa.sbias, device="meta"))
    try:
        with torch.no_grad():
            assert _declines(sa, x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("shape,said", [((2, 32, 5, 5), "built for 64 channels"), ((2, 64), "got 2-D input")])
def test_bad_input_under_no_grad_gets_the_layers_error(shape, said):
    with torch.no_grad(), pytest.raises(ValueError, match=said):
        _layer()(torch.randn(shape))


def test_recording_and_transforms_under_no_grad_still_get_pytorch_ops():
    """jit.trace, vmap and forward AD under no_grad: the general path's PyTorch form."""
    sa, x = _layer(), torch.randn(3, 64, 5, 6)
    ref = _exact(sa, x).float()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(sa, x, check_trace=False)
        assert "sanet::" not in traced.graph.str()
        x2 = torch.randn_like(x)  # an op the tracer did not see would be a constant in the graph
        assert rel_err(traced(x2), _exact(sa, x2).float()) <= FP32_TOL
        assert rel_err(torch.func.vmap(lambda xi: sa(xi[None])[0])(x), ref) <= FP32_TOL
        t = torch.randn_like(x)
        with torch.autograd.forward_ad.dual_level():
            out = sa(torch.autograd.forward_ad.make_dual(x, t))
            tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
        assert tangent is not None and rel_err(torch.func.jvp(sa, (x,), (t,))[1], tangent) <= FP32_TOL


def test_compile_under_no_grad_has_no_graph_break():
    """torch.compile traces is_compiling() as True and skips the short path: one graph."""
    sa, x = _layer(), torch.randn(2, 64, 5, 6)
    compiled = torch.compile(sa, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert rel_err(compiled(x), _exact(sa, x)) <= FP32_TOL
