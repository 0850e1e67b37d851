"""Fused kernels against the paper-literal formulation (issue: SA at the cost of a copy).
BatchNorm + SA as one op: ``test_fused_bn.py``.

Every comparison runs on fresh random inputs and random (trained-looking) parameters, and
checks the output and every gradient: input, the six SA parameters and, where BatchNorm is
fused, its parameters and running statistics.
"""
from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from torch import nn

import sanet
from sanet.analysis.memory import saved_tensor_bytes
from sanet.layers import shuffle_attention_reference
from sanet.ops import bn_shuffle_attention, fused_bn_sa_supported, fused_sa_supported, shuffle_attention_fused
from sanet.ops.sa_op import sa_forward

from conftest import case_seed, randomize_sa_
from sa_reference import authors_sa_nd
from fused_utils import bn_sa_pair, fused_and_unfused_models, grads, randomize, rel, require_cpu_ext, sa_params

require_cpu_ext()


CASES = [
    # shape, groups, layout
    ((2, 64, 7, 9), 8, "contiguous"),
    ((1, 128, 5, 5), 64, "contiguous"),
    ((3, 32, 4, 6), 1, "contiguous"),
    ((2, 64, 7, 9), 8, "channels_last"),
    ((2, 64, 7, 9), 8, "non_contiguous"),
    ((2, 16, 11), 4, "contiguous"),        # 1-D
    ((2, 32, 3, 5, 4), 8, "contiguous"),   # 3-D
    ((2, 256, 28, 28), 64, "contiguous"),  # planes larger than a vector tail, many groups
    ((1, 56, 11, 12), 4, "contiguous"),    # plane count not a multiple of either batch size
]


def make_input(shape, layout, gen):
    if layout == "non_contiguous":
        big = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], generator=gen)
        return big[..., ::2]
    x = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


@pytest.fixture
def threads():
    """Two threads whatever OMP_NUM_THREADS says: the kernels then split their work into
    parallel chunks, most of which start mid-tensor (one thread would run one chunk from 0)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape,groups,layout", CASES)
def test_fused_matches_reference_fp32(shape, groups, layout, threads):
    gen = torch.Generator().manual_seed(case_seed(shape, groups, layout))
    sa = sanet.ShuffleAttention(shape[1], groups, impl="fused")
    randomize(sa, gen)
    x = make_input(shape, layout, gen).requires_grad_(True)
    assert fused_sa_supported(x)
    y = sa(x)
    y_ref = shuffle_attention_reference(x, *sa_params(sa), groups, sa.gn.eps)
    g = torch.randn(y_ref.shape, generator=gen)
    inputs = [x] + sa_params(sa)
    for a, b in zip(grads(y, inputs, g), grads(y_ref, inputs, g)):
        assert a.shape == b.shape
        assert rel(a, b) <= 1e-5
    assert rel(y, y_ref) <= 1e-5
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def _op(x, params, groups, *, shortcut=None, w=None, b=None, train=False, relu=False, mean=None, var=None):
    return sa_forward(x, shortcut, *params, groups, 1e-5, w, b, mean, var, train, 1e-5, relu)[0]


@pytest.mark.parametrize("mode", ["sa", "bn_train", "bn_eval", "bn_train_add_relu", "bn_eval_add_relu"])
def test_fused_op_gradcheck_fp64(mode):
    gen = torch.Generator().manual_seed(1)
    G, C = 2, 8
    x = torch.randn(2, C, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(C // (2 * G), generator=gen, dtype=torch.float64).requires_grad_() for _ in range(6)]
    w = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True)
    sc = torch.randn(2, C, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(C, generator=gen, dtype=torch.float64)
    var = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    if mode == "sa":
        fn, inputs = (lambda x, *p: _op(x, p, G)), (x, *params)
    else:
        train, relu = mode.startswith("bn_train"), mode.endswith("relu")
        stats = {} if train else {"mean": mean, "var": var}

        def fn(x, w, b, sc, *p):
            return _op(x, p, G, shortcut=sc if relu else None, w=w, b=b, train=train, relu=relu, **stats)

        inputs = (x, w, b, sc, *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _plain_twin(name: str) -> nn.Module:
    """The same network without SA (timm ResNet, same arguments, no attention layer)."""
    from timm.models.resnet import Bottleneck, ResNet

    args = dict(sanet.SA_MODELS[name])
    args.pop("fit_groups", None)
    args["block"] = Bottleneck
    return ResNet(**args)


def test_block_fusion_matches_unfused_model_fp64():
    """A whole SA network: fused tails vs the same weights run op by op (reference SA)."""
    gen = torch.Generator().manual_seed(5)
    fused, unfused = fused_and_unfused_models(10, gen)
    x = torch.randn(3, 3, 48, 48, dtype=torch.float64, generator=gen)
    for train in (True, False):
        fused.train(train)
        unfused.train(train)
        y, y_ref = fused(x), unfused(x)
        assert rel(y, y_ref) < 1e-10
        g = torch.randn(y.shape, dtype=y.dtype, generator=gen)
        names = [n for n, _ in fused.named_parameters()]
        pairs = zip(names, grads(y, list(fused.parameters()), g), grads(y_ref, list(unfused.parameters()), g))
        for name, a, b in pairs:
            assert rel(a, b) < 1e-9, name
    for (name, a), b in zip(fused.named_buffers(), unfused.buffers()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
    assert fused.layer1[0].bn3.num_batches_tracked.item() == 1


def test_fused_layer_keeps_only_its_input():
    x = torch.randn(4, 256, 14, 14, requires_grad=True)
    fused = saved_tensor_bytes(lambda: sanet.ShuffleAttention(256, 64, impl="fused")(x))
    ref = saved_tensor_bytes(lambda: sanet.ShuffleAttention(256, 64, impl="reference")(x))
    x_bytes = x.numel() * x.element_size()
    # x, per-(n, c) statistics and the six parameters packed as one small array
    assert fused["bytes"] <= x_bytes + 4 * 256 * 8 * 2 + 4096
    assert ref["bytes"] >= 2 * x_bytes


def test_model_saved_bytes_close_to_plain_resnet():
    """SA-ResNet with fused tails keeps at most 5% more for backward than the plain net, in
    either layout: with channels_last the op saves the channels_last tensors the layers around
    it keep anyway, not contiguous copies (sa_resnet50 went from 1.16x to 1.002x)."""
    ratios = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 3, 64, 64).to(memory_format=fmt)
        sa_model = timm.create_model("sa_resnet_test").train().to(memory_format=fmt)
        plain = _plain_twin("sa_resnet_test").train().to(memory_format=fmt)
        reference = timm.create_model("sa_resnet_test", sa_impl="reference").train().to(memory_format=fmt)
        sa_bytes = saved_tensor_bytes(lambda: sa_model(x).sum())["bytes"]
        plain_bytes = saved_tensor_bytes(lambda: plain(x).sum())["bytes"]
        ref_bytes = saved_tensor_bytes(lambda: reference(x).sum())["bytes"]
        ratios[fmt] = sa_bytes / plain_bytes
        assert sa_bytes <= 1.05 * plain_bytes
        assert ref_bytes > 1.05 * plain_bytes  # the authors' formulation would fail the bound
    assert ratios[torch.channels_last] == pytest.approx(ratios[torch.contiguous_format], abs=1e-3)


def test_deterministic():
    gen = torch.Generator().manual_seed(6)
    model = timm.create_model("sa_resnet_test", num_classes=5).train()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    state = copy.deepcopy(model.state_dict())
    outs = []
    for _ in range(2):
        model.load_state_dict(state)
        model.zero_grad()
        y = model(x)
        y.sum().backward()
        outs.append([y.detach()] + [p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("shape", [(2, 64, 7, 9), (2, 32, 3, 5, 4), (2, 16, 11)])
def test_no_grad_forward_equals_grad_forward(shape):
    """Without grad, sa_op calls the kernel alone (no autograd.Function); same output."""
    gen = torch.Generator().manual_seed(case_seed(shape))
    sa = sanet.ShuffleAttention(shape[1], 4, impl="fused")
    randomize(sa, gen)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        y = sa(x)
    assert not y.requires_grad and y.shape == x.shape
    assert torch.equal(y, sa(x).detach())


def test_dispatch_modes_see_the_fused_op():
    """Under a TorchDispatchMode the op goes through the dispatcher: fake tensors get shapes,
    the memory tracker counts the kernels' outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sanet.analysis.memory import PeakMemoryTracker

    sa = sanet.ShuffleAttention(64, 8, impl="fused")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = sa(mode.from_tensor(torch.randn(2, 64, 5, 6)))
    assert y.shape == (2, 64, 5, 6)
    x = torch.randn(4, 64, 16, 16, requires_grad=True)
    g = torch.randn_like(x)
    with PeakMemoryTracker() as tracker:
        y = sa(x)
        y.backward(g)
    assert tracker.peak >= 2 * x.numel() * x.element_size()  # the output and grad x at least


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_on_cpu_is_the_fp32_kernel_rounded_once(monkeypatch, dtype, layout):
    """fp16/bf16 input (what CPU autocast gives SA) runs the C++ kernel, in fp32 inside: the
    output and the input's gradient are the fp32 results for the same values rounded once, the
    parameters' gradients are the fp32 ones exactly, and it is as close to the fp32 oracle as
    one rounding allows. Before, 'auto' ran the authors' formulation in half precision."""
    require_cpu_ext()
    from sanet.ops import sa_op

    seen = []
    real = sa_op._cpu_ext()
    monkeypatch.setattr(sa_op, "_cpu_ext", lambda: seen.append(1) or real)
    gen = torch.Generator().manual_seed(case_seed(str(dtype), layout))
    sa = sanet.ShuffleAttention(64, 8)
    randomize(sa, gen)
    x = torch.randn(2, 64, 5, 7, generator=gen).to(dtype)
    g = torch.randn(2, 64, 5, 7, generator=gen).to(dtype)
    if layout == "channels_last":
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    assert fused_sa_supported(x)
    def run(x, g):
        x = x.detach().requires_grad_(True)
        y = sa(x)
        return (y, *torch.autograd.grad(y, [x, *sa.parameters()], g))

    y, gx, *gp = run(x, g)
    assert seen, "the C++ kernel did not run"
    assert y.dtype == dtype and gx.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    y32, gx32, *gp32 = run(x.float(), g.float())
    assert torch.equal(y, y32.to(dtype)) and torch.equal(gx, gx32.to(dtype))
    for a, b in zip(gp, gp32):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    want = authors_sa_nd(x.float(), dict(sa.named_parameters()), 8)  # fp32 on the same half input
    assert rel(y.float(), want) < {torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # one rounding
    with torch.no_grad():  # the kernel alone, without autograd: the same values
        assert torch.equal(sa(x), y.detach())


def test_drop_path_falls_back_in_training_only():
    """In training, stochastic depth runs between SA and the residual add: the block's result
    (drawn paths included) and gradients equal the unfused reference's for the same draws
    (in fp64: through a whole network fp32 rounding alone moves single gradients by ~1e-4)."""
    model = timm.create_model("sa_resnet_test", drop_path_rate=0.5).double()
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, sanet.ShuffleAttention):
            m.impl = "reference"
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model.train(), ref.train()
    outs = []
    for net in (model, ref):
        torch.manual_seed(3)  # the same paths dropped in both
        out = net(x)
        out.square().sum().backward()
        outs.append(out)
    assert rel(outs[0], outs[1]) < 1e-10
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        # (atol: layer4's 1x1 planes give sweight a gradient of exactly 0, the reference ~1e-13)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)
    torch.manual_seed(4)  # other draws, another result: the paths were really dropped
    assert rel(copy.deepcopy(model)(x), outs[0]) > 1e-3  # (a copy: its BatchNorm statistics move)
    model.eval(), ref.eval()
    assert rel(model(x), ref(x)) < 1e-10


def test_block_with_another_activation_is_not_fused_as_relu():
    """The fused tail ends in ReLU: a block built with another activation (act_layer="silu")
    runs its own, as the same model with the reference SA (which never fuses) does."""
    gen = torch.Generator().manual_seed(8)
    model, ref = fused_and_unfused_models(5, gen, act_layer="silu")
    assert type(model.layer1[0].act3) is nn.SiLU
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=gen)
    for train in (True, False):
        model.train(train), ref.train(train)
        assert rel(model(x), ref(x)) < 1e-10


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
def test_forward_hook_on_the_block_activation_runs_once_per_forward(block):
    """The fused tail would skip the block's final activation module, and its hooks with it."""
    if block == "bottleneck":
        net = timm.create_model("sa_resnet_test", num_classes=5).eval()
        act, x = net.layer1[0].act3, torch.randn(1, 3, 32, 32)
    else:
        net = sanet.SABasicBlock(64, 64).eval()
        act, x = net.act2, torch.randn(2, 64, 6, 6)
    seen = []
    act.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    for _ in range(2):
        net(x)
    assert len(seen) == 2


def test_compile_fullgraph_matches_eager():
    gen = torch.Generator().manual_seed(7)
    sa = sanet.ShuffleAttention(32, 4)
    randomize(sa, gen)
    x = torch.randn(2, 32, 5, 6, generator=gen, requires_grad=True)
    g = torch.randn(2, 32, 5, 6, generator=gen)
    compiled = torch.compile(sa, fullgraph=True, backend="aot_eager")
    inputs = [x] + sa_params(sa)
    y, yc = sa(x), compiled(x)
    assert torch.equal(y, yc)
    for a, b in zip(grads(y, inputs, g), grads(yc, inputs, g)):
        assert torch.equal(a, b)


def test_fx_feature_extraction_of_fused_model():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = timm.create_model("sa_resnet_test").eval()
    extractor = create_feature_extractor(model, {"layer2": "c3", "layer4": "c5"})
    x = torch.randn(1, 3, 64, 64)
    feats = extractor(x)
    assert feats["c5"].shape == (1, 256, 2, 2)
    assert rel(model.forward_head(feats["c5"]), model(x)) < 1e-5


def test_auto_without_a_kernel_runs_the_authors_formulation(monkeypatch):
    """Where no kernel exists (no compiler, bf16 on CPU) "auto" runs the reference: faster and
    leaner than the per-channel PyTorch form (docs/benchmarks.md)."""
    import sanet.layers.shuffle_attention as sa_mod

    calls = []
    real = sa_mod._IMPL_FNS["reference"]
    monkeypatch.setattr(sa_mod, "fused_sa_supported", lambda x, *params: False)
    monkeypatch.setitem(sa_mod._IMPL_FNS, "reference", lambda *a: calls.append(1) or real(*a))
    sanet.ShuffleAttention(32, 4)(torch.randn(2, 32, 5, 5))
    assert calls == [1]


def _meta(module: nn.Module, *names: str) -> None:
    """Put some of a module's parameters or buffers on "meta" (another device than the input)."""
    for name in names:
        t = getattr(module, name)
        new = t.detach().to("meta")
        if isinstance(t, nn.Parameter):
            setattr(module, name, nn.Parameter(new))
        else:
            module.register_buffer(name, new)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("moved", ["bn3", "sa", "running_var"])
def test_block_with_a_tensor_on_another_device_gives_a_device_error(train, moved):
    """The fused tail needs every tensor it reads on x's device (the C++ kernel would read
    them through host pointers: "data is not allocated yet" for meta, a crash for CUDA). A
    module on another device: the modules run one by one and PyTorch names the devices; one
    tensor moved by hand: the op's own check names it."""
    block = timm.create_model("sa_resnet_test").layer1[0].train(train)
    if moved == "bn3":
        block.bn3.to("meta")
    elif moved == "sa":
        block.sa.to("meta")
    else:
        _meta(block.bn3, "running_var")
    x = torch.randn(2, block.conv1.in_channels, 6, 6)
    mid = torch.randn(2, block.bn3.num_features, 6, 6)
    assert fused_bn_sa_supported(mid, block.bn3, block.sa, mid) is (moved == "running_var")
    with pytest.raises(RuntimeError, match="device") as info:
        block(x)
    assert "not allocated" not in str(info.value)
    if moved == "running_var":
        assert isinstance(info.value, sanet.SanetError)
        assert re.search(r"(bn\.running_var|bn_var) is on meta but the input x is on cpu", str(info.value))


@pytest.mark.parametrize("case,name", [("bn", "bn_weight"), ("shortcut", "shortcut"),
                                       ("running_mean", "bn.running_mean")])
def test_bn_shuffle_attention_names_a_tensor_on_another_device(case, name):
    gen = torch.Generator().manual_seed(11)
    bn, sa, _, _ = bn_sa_pair(16, 2, gen, torch.float32)
    x = torch.randn(2, 16, 3, 3, generator=gen)
    shortcut = torch.randn(2, 16, 3, 3, generator=gen)
    if case == "bn":
        bn.eval().to("meta")
    elif case == "shortcut":
        shortcut = shortcut.to("meta")
    else:
        _meta(bn, "running_mean")  # training: updated after the op, checked before it
    before = [t.clone() for t in (bn.running_var, bn.num_batches_tracked)]
    with pytest.raises(sanet.SanetError, match=rf"{name} is on meta but the input x is on cpu"):
        bn_shuffle_attention(x, bn, sa, shortcut, relu=True)
    if case == "running_mean":  # nothing was updated
        assert all(torch.equal(a, b) for a, b in zip(before, (bn.running_var, bn.num_batches_tracked)))


def test_flop_counter_runs_the_authors_formulation(monkeypatch):
    """FlopCounterMode registers global module hooks (torch.utils.module_tracker), so under it
    the layer runs the authors' formulation module by module (docs/kernels.md says so, and
    `sanet info` counts that); its count is the same: SA has no matmul or convolution."""
    from torch.utils.flop_counter import FlopCounterMode

    import sanet.layers.shuffle_attention as sa_mod

    calls = []
    real = sa_mod.ShuffleAttention._forward_calling_gn
    monkeypatch.setattr(sa_mod.ShuffleAttention, "_forward_calling_gn",
                        lambda self, x: calls.append(1) or real(self, x))
    sa = sanet.ShuffleAttention(32, 4)
    x = torch.randn(2, 32, 5, 5)
    with FlopCounterMode(display=False) as counter:
        y = sa(x)
    assert calls == [1] and counter.get_total_flops() == 0
    assert rel(y, shuffle_attention_reference(x, *sa_params(sa), 4, sa.gn.eps)) < 1e-6


# ------------------------------------------------ the public functional ops as users call them

def test_functional_fused_op_under_torch_func_and_forward_ad():
    """torch.func and forward-mode AD have no rule for the kernels: the public functions
    compute with PyTorch ops there (as the layer does), instead of torch's message about
    an autograd.Function the user never wrote."""
    gen = torch.Generator().manual_seed(21)
    bn, sa, _, _ = bn_sa_pair(8, 2, gen, torch.float64)
    params = [sa.cweight, sa.cbias, sa.sweight, sa.sbias, sa.gn.weight, sa.gn.bias]
    x = torch.randn(2, 8, 3, 4, generator=gen, dtype=torch.float64)
    want = torch.func.grad(lambda x: shuffle_attention_reference(x, *params, 2).square().sum())(x)
    got = torch.func.grad(lambda x: shuffle_attention_fused(x, *params, 2).square().sum())(x)
    assert rel(got, want) <= 1e-12
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(lambda x: shuffle_attention_fused(x, *params, 2), (x,), (tangent,))
    _, jvp_ref = torch.func.jvp(lambda x: shuffle_attention_reference(x, *params, 2), (x,), (tangent,))
    assert rel(jvp, jvp_ref) <= 1e-12
    bn.eval()
    batched = torch.func.vmap(lambda x: bn_shuffle_attention(x, bn, sa, relu=True))(x.unsqueeze(1))
    assert rel(batched.squeeze(1), torch.relu(sa(bn(x)))) <= 1e-12


def test_functional_fused_op_without_a_kernel_for_the_dtype_says_so():
    sa = sanet.ShuffleAttention(8, 2)
    params = [sa.cweight, sa.cbias, sa.sweight, sa.sbias, sa.gn.weight, sa.gn.bias]
    with pytest.raises(sanet.SanetError, match=r"no fused kernel for meta torch.float32 input .*shuffle_attention_torch"):
        shuffle_attention_fused(torch.ones(2, 8, 3, 3, device="meta"), *(p.to("meta") for p in params), 2)
    with pytest.raises(TypeError, match="floating-point input"):  # no kernel could take it: the input's fault
        shuffle_attention_fused(torch.ones(2, 8, 3, 3, dtype=torch.int64), *params, 2)


def test_functional_fused_op_in_fx_graphs_keeps_its_checks():
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sa = randomize_sa_(sanet.ShuffleAttention(8, 2))

        def forward(self, x):
            sa = self.sa
            return shuffle_attention_fused(x, sa.cweight, sa.cbias, sa.sweight, sa.sbias, sa.gn.weight,
                                           sa.gn.bias, 2)

    wrap = Wrap()
    sa = wrap.sa
    params = [sa.cweight, sa.cbias, sa.sweight, sa.sbias, sa.gn.weight, sa.gn.bias]
    traced = torch.fx.symbolic_trace(wrap)
    x = torch.randn(2, 8, 5, 3)
    assert rel(traced(x), shuffle_attention_reference(x, *params, 2)) <= 1e-5
    with pytest.raises(ValueError, match=r"got 2-D input of shape \[2, 8\]"):
        traced(torch.randn(2, 8))


