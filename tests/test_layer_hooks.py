"""Hooks on SA's GroupNorm (``sa.gn``): every ``impl`` then calls it as a module, so forward
hooks fire and ``torch.nn.utils.prune`` on ``gn.weight`` trains; results equal the reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sanet import ShuffleAttention

from conftest import randomize_sa_, rel_err, require_fused
from sa_reference import FP32_TOL, IMPLS, AuthorsSA, authors_sa_nd, check_against, make_pair, ref_params_of


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


@pytest.mark.parametrize("shape", [(2, 32, 11), (1, 32, 2, 3, 5), (0, 32, 3, 3), (4, 32, 1, 1), (2, 32, 1)],
                         ids=["1d", "3d", "empty", "1x1", "1d-1"])  # one-pixel planes: gn is called too
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


@pytest.mark.parametrize("impl", IMPLS)
def test_gn_backward_pre_hook_runs_once_per_backward(impl):
    """A full backward pre-hook on gn (module backward hooks count as hooks: gn is called)."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(32, 4, impl=impl))
    calls = []
    module.gn.register_full_backward_pre_hook(lambda m, grad_out: calls.append(grad_out[0].shape))
    x = torch.randn(2, 32, 5, 7, requires_grad=True)
    for _ in range(2):
        module(x).square().sum().backward()
    assert calls == [(8, 4, 5, 7)] * 2


def test_gn_hook_with_bf16_parameters_and_fp32_input():
    """A bf16 layer on fp32 input (test_layer.py's test_low_precision_parameters_with_fp32_input)
    with a hook on gn: gn gets input of its own dtype, as without the hook; same result."""
    module = randomize_sa_(ShuffleAttention(16, 2)).bfloat16()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        plain = module(x)
        seen = []
        module.gn.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
        hooked = module(x)
    assert seen == [torch.bfloat16]
    assert hooked.dtype == plain.dtype == torch.float32
    assert rel_err(hooked, plain) <= 4e-3  # gn's output rounded to bf16 (8 bits) in the hooked path


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
    for name, p in module.named_parameters():  # zero, as without the hook: not NaN, not None
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


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


@pytest.mark.parametrize("hooked", ["gn", "global"])
def test_one_value_per_group_with_hooks_says_why(hooked):
    """With hooks SA calls nn.GroupNorm, which refuses one value per group with a message about
    "training" that names neither SA nor the hook; SA's says both. Without hooks it computes."""
    from torch.utils.flop_counter import FlopCounterMode

    from sanet import SanetError

    module = ShuffleAttention(64, 1)
    x = torch.randn(1, 64, 1, 1)
    expected = module(x)  # no hooks: defined (test_layer.py checks the value)
    if hooked == "gn":
        module.gn.register_forward_hook(lambda m, i, o: None)
        context = torch.no_grad()
    else:
        context = FlopCounterMode(display=False)  # sets global module hooks
    with context, pytest.raises(SanetError, match=r"input \[1, 64, 1, 1\] gives GroupNorm one value per group.*"
                                r"gn has hooks.*Remove the hooks"):
        module(x)
    assert torch.isfinite(expected).all()
    x2 = torch.randn(2, 64, 1, 1)  # two samples: GroupNorm takes it, hooks and all
    with context:
        assert module(x2).shape == x2.shape
