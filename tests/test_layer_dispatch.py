"""Where SA's paths part ways: the per-channel form on constant planes of large values and with
an inf pixel, the gn-hooks path's fp32 gate, global module hooks, the fused functional under
torch.func and fx, the fake kernel's gradient dtype, what the BatchNorm tail fuses (shortcut
shape, BatchNorm subclasses, running statistics elsewhere), and ``sa_impl`` in the models."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules import module as nn_module

from sanet import ShuffleAttention
from sanet.errors import SanetError
from sanet.ops import bn_shuffle_attention

from conftest import randomize_sa_, rel_err, require_fused
from sa_reference import FP32_TOL, authors_sa_nd


def _exact(module: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    p = {k: v.detach().double() for k, v in module.named_parameters()}
    return authors_sa_nd(x.double(), p, groups)


# --------------------------------------------------------------------------- constant planes
# (Not "reference": the authors' GroupNorm centres once, with its fp32 mean: 8e-4 off here.)
# "fx": an "auto" layer's fx graph holds the per-channel form, not the reference.
@pytest.mark.parametrize("impl", ["auto", "fused", "torch", "fx"])
@pytest.mark.parametrize("hw", [(5, 7), (33, 35)])
def test_constant_planes_of_large_values_keep_their_gates(impl, hw):
    """Constant planes far from 0 normalise to exactly 0 (gate sigmoid(sbias)). The fp32 mean
    of 1000.1 is off by a rounding that the spatial slope (sweight * gn.weight / sqrt(eps))
    would spread over the plane: the per-channel form centres twice (without the second pass
    the error was 3e-3 here)."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(16, 2, impl="auto" if impl == "fx" else impl))
    x = torch.full((2, 16) + hw, 1000.1) * torch.linspace(1, 1.7, 16).reshape(1, 16, 1, 1)
    with torch.no_grad():
        out = (torch.fx.symbolic_trace(module) if impl == "fx" else module)(x)
    assert rel_err(out, _exact(module, x, 2)) <= FP32_TOL


@pytest.mark.parametrize("impl", ["auto", "fused", "torch"])
def test_inf_pixel_like_the_reference(impl):
    """An inf pixel saturates its channel-branch gates and makes its spatial-branch planes NaN
    (GroupNorm's inf - inf), as in the reference; the channel-branch planes beside a NaN
    spatial plane keep finite values (their gate has no slope: no NaN * 0 from the other
    branch's statistics)."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(16, 2, impl=impl))
    ref = ShuffleAttention(16, 2, impl="reference")
    ref.load_state_dict(module.state_dict())
    x = torch.randn(2, 16, 16)
    x[0, :, 7] = float("inf")
    with torch.no_grad():
        y, r = module(x), ref(x)
    assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isinf(), r.isinf())
    assert r[0].isfinite().sum() > 0  # sample 0's channel-branch planes kept finite values
    torch.testing.assert_close(y[r.isfinite()], r[r.isfinite()], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- gn hooks
def test_gn_hook_path_computes_the_gate_in_fp32_with_bf16_parameters():
    """bf16 parameters, fp32 input, a hook on gn: gn's output is bf16 (its module's dtype) but
    the gate is computed from it in fp32. With small spatial weights the gn rounding hardly
    reaches the output (~1e-5); a gate rounded to bf16 is off by ~1e-3 everywhere."""
    module = randomize_sa_(ShuffleAttention(16, 2))
    with torch.no_grad():
        module.sweight.mul_(0.05)
    module.bfloat16()
    module.gn.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        out = module(x)
    assert out.dtype == torch.float32
    assert rel_err(out, _exact(module, x, 2)) <= 2e-4


_GLOBAL_HOOKS = {
    "forward_pre": lambda seen: nn_module.register_module_forward_pre_hook(lambda m, a: seen.append(m)),
    "forward": lambda seen: nn_module.register_module_forward_hook(lambda m, a, o: seen.append(m)),
    "backward": lambda seen: nn_module.register_module_full_backward_hook(lambda m, gi, go: seen.append(m)),
    "backward_pre": lambda seen: nn_module.register_module_full_backward_pre_hook(lambda m, go: seen.append(m)),
}


@pytest.mark.parametrize("kind", sorted(_GLOBAL_HOOKS))
def test_global_module_hooks_see_gn_called(kind):
    """Global module hooks (FlopCounterMode's, profilers') count as hooks on gn: "auto" calls
    gn as a module, so they run for it; same output as the reference."""
    module = randomize_sa_(ShuffleAttention(16, 2))
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    seen = []
    handle = _GLOBAL_HOOKS[kind](seen)
    try:
        out = module(x)
        out.sum().backward()
    finally:
        handle.remove()
    assert any(m is module.gn for m in seen), seen
    assert rel_err(out, _exact(module, x.detach(), 2)) <= FP32_TOL


# --------------------------------------------------------------------------- fused op contracts
@pytest.mark.parametrize("capture", ["vmap", "fx"])
def test_fused_functional_under_torch_func_and_fx_is_the_pytorch_form(capture):
    """shuffle_attention_fused where the kernels can't run (torch.func has no batching rule
    for them, fx records PyTorch ops only): the per-channel form, the same function."""
    from sanet.ops import shuffle_attention_fused

    module = randomize_sa_(ShuffleAttention(16, 2))
    params = [p.detach() for p in module.parameters()]
    x = torch.randn(2, 16, 4, 5)

    def fn(t):
        return shuffle_attention_fused(t, *params, 2)

    if capture == "vmap":
        out = torch.func.vmap(fn)(x[None])[0]
    else:
        traced = torch.fx.symbolic_trace(fn)
        assert "sa_forward" not in str(traced.graph)  # PyTorch ops (and the checks) only
        out = traced(x)
    assert rel_err(out, _exact(module, x, 2)) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fake_backward_gives_the_kernels_parameter_gradient_dtype(dtype):
    """sa_backward's fake kernel (torch.compile's shapes) gives the (6, c) parameter-gradient
    block the real kernel's dtype: fp32 for half-precision gates on fp32 input, not the gates'."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    require_fused("fused")
    x, g = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)
    params = [torch.randn(4, dtype=dtype) for _ in range(6)]
    _, pm, pv, _, _ = torch.ops.sanet.sa_forward(x, None, *params, 2, 1e-5, None, None, None, None, False,
                                                 1e-5, False)

    def backward(*t):
        return torch.ops.sanet.sa_backward(t[0], t[1], None, t[2], t[3], *t[4:], 2, 1e-5, None, None, None,
                                           None, False, 1e-5)

    real = backward(g, x, pm, pv, *params)
    with FakeTensorMode() as mode:
        fake = backward(*(mode.from_tensor(t) for t in (g, x, pm, pv, *params)))
    assert real[2].dtype == torch.float32
    assert [(t.dtype, t.shape) for t in fake] == [(t.dtype, t.shape) for t in real]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bn_tail_with_a_broadcast_shortcut_is_bn_then_sa_plus_shortcut(train):
    """A shortcut that broadcasts against x (not x's shape) is added as ``x + shortcut`` would
    add it: the modules one by one (the op takes a shortcut of x's shape only)."""
    require_fused("fused")
    bn = nn.BatchNorm2d(16).train(train)
    sa = randomize_sa_(ShuffleAttention(16, 2))
    ref_bn = nn.BatchNorm2d(16).train(train)
    x, shortcut = torch.randn(2, 16, 4, 5), torch.randn(16, 1, 1)
    out = bn_shuffle_attention(x, bn, sa, shortcut, relu=True)
    want = torch.relu(_exact(sa, ref_bn(x).detach(), 2) + shortcut.double())
    assert out.shape == x.shape and rel_err(out, want) <= FP32_TOL
    assert torch.equal(bn.running_mean, ref_bn.running_mean)


class _ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bn_tail_with_a_batchnorm_subclass_calls_its_forward(train):
    """A BatchNorm2d subclass may compute something else: the tail calls its forward (the op
    fuses plain nn.BatchNorm2d only)."""
    require_fused("fused")
    bn = _ScaledBN(16).train(train)
    sa = randomize_sa_(ShuffleAttention(16, 2))
    x = torch.randn(2, 16, 4, 5)
    out = bn_shuffle_attention(x, bn, sa, relu=True)
    ref_bn = nn.BatchNorm2d(16).train(train)
    want = torch.relu(_exact(sa, (ref_bn(x) * 2).detach(), 2))
    assert rel_err(out, want) <= FP32_TOL


def test_bn_tail_refuses_running_statistics_on_another_device_before_running():
    """Training BatchNorm whose running mean is elsewhere (here "meta") is refused before the
    op runs, naming the tensor: the statistics (and num_batches_tracked) stay untouched."""
    require_fused("fused")
    bn = nn.BatchNorm2d(16).train()
    bn.running_mean = bn.running_mean.to("meta")
    sa = ShuffleAttention(16, 2)
    with pytest.raises(SanetError, match=r"bn\.running_mean is on meta but the input x is on cpu"):
        bn_shuffle_attention(torch.randn(2, 16, 3, 3), bn, sa)
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_var, torch.ones(16))


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", ["sa_resnet50", "sa_resnet18"])  # plain and fitted G
def test_sa_impl_reaches_every_sa_layer(name):
    model = timm.create_model(name, sa_impl="torch", device="meta")
    layers = [m for m in model.modules() if isinstance(m, ShuffleAttention)]
    assert layers and all(m.impl == "torch" for m in layers)
    assert all(m.impl == "auto" for m in timm.create_model(name, device="meta").modules()
               if isinstance(m, ShuffleAttention))
