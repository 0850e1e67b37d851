"""BatchNorm + SA (+ shortcut + ReLU) as one op (``sanet.ops.bn_shuffle_attention``, the
fused SA-ResNet block tail) against BatchNorm then the paper-literal SA: outputs, every
gradient (input, shortcut, SA's and BatchNorm's parameters) and running statistics, in
training and eval; and where the op does not fit, the modules one by one.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sanet
from sanet.ops import bn_shuffle_attention

from fused_utils import bn_sa_pair, grads, randomize, rel, require_cpu_ext, run_bn_sa

require_cpu_ext()


# Small planes take the kernels' two-pass path for training BatchNorm, large ones (>= 8 KiB
# per plane) the per-channel walk: both are checked.
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu", [False, True])
# momentum=0.0 freezes the running statistics (not None's cumulative average).
@pytest.mark.parametrize("momentum,affine,hw", [(0.1, True, (6, 7)), (None, True, (6, 7)), (0.0, True, (6, 7)),
                                                (0.1, False, (6, 7)), (0.1, True, (33, 35))])
def test_bn_sa_fusion_fp64_exact(train, relu, momentum, affine, hw):
    gen = torch.Generator().manual_seed(2)
    C, G = 64, 8
    bn, sa, ref_bn, ref_sa = bn_sa_pair(C, G, gen, torch.float64, momentum, affine)
    bn.train(train)
    ref_bn.train(train)
    x = torch.randn(3, C, *hw, generator=gen, dtype=torch.float64) * 2 + 0.5
    sc = torch.randn(3, C, *hw, generator=gen, dtype=torch.float64)
    for step in range(2):  # twice: running statistics must update exactly once per call
        (y, g), (y_ref, g_ref) = run_bn_sa(bn, sa, ref_bn, ref_sa, x, sc, relu, gen)
        assert rel(y, y_ref) < 1e-12
        for a, b in zip(g, g_ref):
            assert rel(a, b) < 1e-10
        assert torch.allclose(bn.running_mean, ref_bn.running_mean, rtol=1e-12, atol=1e-14)
        assert torch.allclose(bn.running_var, ref_bn.running_var, rtol=1e-12, atol=1e-14)
        assert bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == (step + 1 if train else 0)



def test_eval_backward_after_a_training_call_uses_its_own_forwards_statistics():
    """An eval-mode call normalises with BN's running statistics, and its backward needs them;
    a training call before that backward updates them in place (e.g. a loss on a frozen-BN
    pass taken between steps). The op keeps the values of its own forward, so its gradient is
    that of the function it computed. (nn.BatchNorm2d's own eval backward reads the updated
    buffers here: 0.55 relative off in this case, measured with torch 2.14.)"""
    gen = torch.Generator().manual_seed(5)
    bn, sa, ref_bn, ref_sa = bn_sa_pair(32, 4, gen, torch.float64)
    bn.eval(), ref_bn.eval()
    x = torch.randn(2, 32, 5, 6, generator=gen, dtype=torch.float64) * 2 + 0.5
    sc = torch.randn(2, 32, 5, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    want, = grads(torch.relu(ref_sa(ref_bn(xr)) + sc), [xr], g)  # before anything changes
    xf = x.clone().requires_grad_()
    y = bn_shuffle_attention(xf, bn, sa, sc, relu=True)
    before = bn.running_mean.clone()
    bn.train()
    bn_shuffle_attention(x * 3, bn, sa, sc, relu=True).sum().backward()
    assert not torch.equal(bn.running_mean, before)  # the statistics did move
    got, = grads(y, [xf], g)
    assert rel(got, want) < 1e-12



@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("hw", [(9, 11), (46, 47)])
def test_bn_sa_fusion_fp32_within_reference_precision(train, relu, hw):
    """In fp32 both implementations round; judge each against an fp64 oracle.

    BatchNorm's parameter gradients are sums of many terms of both signs, so even the
    reference is off by up to ~1e-4 relative in fp32; the fused result must be within
    1e-5, or no worse than twice the reference's own error.
    """
    gen = torch.Generator().manual_seed(3)
    C, G = 128, 8
    bn64, sa64, ref_bn64, ref_sa64 = bn_sa_pair(C, G, gen, torch.float64)
    bn32, sa32 = copy.deepcopy(bn64).float(), copy.deepcopy(sa64).float()
    ref_bn32, ref_sa32 = copy.deepcopy(ref_bn64).float(), copy.deepcopy(ref_sa64).float()
    for m in (bn64, ref_bn64, bn32, ref_bn32):
        m.train(train)
    x = torch.randn(4, C, *hw, generator=gen)
    sc = torch.randn(4, C, *hw, generator=gen)
    (_, _), (y64, g64) = run_bn_sa(bn64, sa64, ref_bn64, ref_sa64, x.double(), sc.double(), relu,
                                    torch.Generator().manual_seed(4))
    (y, g), (y_ref, g_ref) = run_bn_sa(bn32, sa32, ref_bn32, ref_sa32, x, sc, relu,
                                        torch.Generator().manual_seed(4))
    assert rel(y, y64) <= 1e-5
    for fused, ref32, oracle in zip(g, g_ref, g64):
        if relu and fused.shape == x.shape:
            # a ReLU whose input is within rounding of 0 may flip; compare where it can't
            keep = (y64.abs() > 1e-4).expand_as(oracle) if fused.shape == y64.shape else None
            fused, ref32, oracle = fused[keep], ref32[keep], oracle[keep]
        assert rel(fused, oracle) <= max(1e-5, 2 * rel(ref32, oracle))
    assert rel(bn32.running_var, ref_bn64.running_var) <= 1e-6



@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4)], ids=["no-samples", "no-pixels"])
def test_bn_sa_on_empty_input_is_bn_then_sa(shape):
    bn, sa = nn.BatchNorm2d(8), sanet.ShuffleAttention(8, 2)
    ref_bn = copy.deepcopy(bn)
    y = bn_shuffle_attention(torch.randn(shape), bn, sa, torch.zeros(shape), relu=True)
    assert y.shape == shape
    ref_bn(torch.randn(shape))
    for a, b in zip(bn.buffers(), ref_bn.buffers()):  # the same bookkeeping as nn.BatchNorm2d's
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError):  # the shortcut is added as on non-empty input
        bn_shuffle_attention(torch.randn(shape), bn, sa, torch.zeros(shape[0], 9, *shape[2:]))



def test_bn_sa_refuses_running_statistics_of_another_width():
    bn = nn.BatchNorm2d(16, affine=False)
    with pytest.raises(ValueError, match=r"bn.running_mean holds 16 values but x has 8 channels"):
        bn_shuffle_attention(torch.randn(2, 8, 4, 4), bn, sanet.ShuffleAttention(8, 2))
    assert bn.num_batches_tracked.item() == 0  # refused before anything changed



def test_bn_shuffle_attention_is_bn_then_sa_where_the_op_does_not_fit():
    """A shortcut that broadcasts, a 3-D input, hooks: the modules one by one (the function
    promised "exactly as bn(x)"; the op raised a bare 'shortcut must match x' or accepted
    what bn(x) refuses)."""
    gen = torch.Generator().manual_seed(22)
    bn, sa, ref_bn, ref_sa = bn_sa_pair(8, 2, gen, torch.float32)
    x = torch.randn(2, 8, 3, 4, generator=gen)
    shortcut = torch.randn(1, 8, 1, 1, generator=gen)
    out = bn_shuffle_attention(x, bn, sa, shortcut, relu=True)
    assert torch.allclose(out, torch.relu(ref_sa(ref_bn(x)) + shortcut), rtol=1e-5, atol=1e-6)
    assert torch.equal(bn.running_mean, ref_bn.running_mean)  # updated once, as bn(x) does
    with pytest.raises(ValueError, match="expected 4D input"):
        bn_shuffle_attention(torch.randn(2, 8, 5), bn, sa)
    seen = []
    sa.gn.register_forward_hook(lambda *args: seen.append(1))
    bn_shuffle_attention(x, bn, sa)
    assert seen == [1]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_without_running_statistics_is_bn_then_sa(train, relu):
    """BatchNorm2d(track_running_stats=False) normalises with the batch's statistics in eval
    too and has no buffers to update: the op does the same."""
    gen = torch.Generator().manual_seed(31)
    bn = nn.BatchNorm2d(32, track_running_stats=False).double().train(train)
    sa = sanet.ShuffleAttention(32, 4).double()
    randomize(bn, gen)
    randomize(sa, gen)
    ref_bn, ref_sa = copy.deepcopy(bn), copy.deepcopy(sa)
    ref_sa.impl = "reference"
    x = torch.randn(3, 32, 5, 6, generator=gen, dtype=torch.float64) * 2 + 0.5
    sc = torch.randn(3, 32, 5, 6, generator=gen, dtype=torch.float64)
    (y, g), (y_ref, g_ref) = run_bn_sa(bn, sa, ref_bn, ref_sa, x, sc, relu, gen)
    assert rel(y, y_ref) < 1e-12
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-10
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None


def test_one_value_per_channel_in_training_is_refused_like_bn():
    bn, sa = nn.BatchNorm2d(16).train(), sanet.ShuffleAttention(16, 2)
    before = copy.deepcopy(bn)
    x = torch.randn(1, 16, 1, 1)
    msg = "Expected more than 1 value per channel when training"
    with pytest.raises(ValueError, match=msg):
        sa(copy.deepcopy(bn)(x))
    with pytest.raises(ValueError, match=msg):
        bn_shuffle_attention(x, bn, sa)
    # refused before any update (nn.BatchNorm2d counts the refused batch in num_batches_tracked)
    for (name, a), b in zip(bn.named_buffers(), before.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bn_dtype", [torch.float64, torch.bfloat16])
def test_bn_of_another_dtype_gives_bn_s_error(bn_dtype):
    """bn(x) refuses a BatchNorm whose dtype is neither x's nor fp32 on half input; so does
    the op, with bn(x)'s error (it promised the same function), not a result."""
    bn, sa = nn.BatchNorm2d(16).to(bn_dtype), sanet.ShuffleAttention(16, 2)
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(Exception) as want:
        sa(copy.deepcopy(bn)(x))
    for train in (True, False):
        with pytest.raises(want.type):
            bn_shuffle_attention(x, bn.train(train), sa, relu=True)


def test_bn_sa_without_a_kernel_runs_the_modules(monkeypatch):
    """No fused kernel (no compiler): the modules one by one, not the op's 'unavailable'."""
    import sanet.ops.fused as fused_mod
    from sanet.ops import sa_op as sa_op_mod

    monkeypatch.setattr(fused_mod, "_cpu_ext_ok", lambda: False)
    monkeypatch.setattr(sa_op_mod, "load_cpu_ext", lambda: None)
    gen = torch.Generator().manual_seed(32)
    bn, sa, ref_bn, ref_sa = bn_sa_pair(16, 2, gen, torch.float32)
    x = torch.randn(2, 16, 4, 4, generator=gen)
    sc = torch.randn(2, 16, 4, 4, generator=gen)
    for train in (True, False):
        bn.train(train), ref_bn.train(train)
        y = bn_shuffle_attention(x, bn, sa, sc, relu=True)
        torch.testing.assert_close(y, torch.relu(ref_sa(ref_bn(x)) + sc), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-6, atol=1e-7)


def test_sync_batchnorm_blocks_never_take_the_fused_op(monkeypatch):
    """``--sync-bn`` (``SyncBatchNorm.convert_sync_batchnorm`` under torchrun) must keep
    SyncBatchNorm's statistics over all processes; the fused op would take this process's
    batch only. So a block whose BatchNorm is a SyncBatchNorm calls the modules. (Without a
    process group SyncBatchNorm is BatchNorm, so this runs on the CPU.)"""
    import timm

    import sanet.models.blocks as blocks

    model = timm.create_model("sa_resnet_test", num_classes=3)
    randomize(model, torch.Generator().manual_seed(5))
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    calls = []
    real = blocks._bn_shuffle_attention
    monkeypatch.setattr(blocks, "_bn_shuffle_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    expected = model(x)
    assert calls  # the same blocks with nn.BatchNorm2d take the fused op
    calls.clear()
    out = sync(x)
    assert calls == []
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sync_bns = [m for m in sync.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(bns) == len(sync_bns)
    for a, b in zip(bns, sync_bns):  # running statistics updated once, alike
        torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-5, atol=1e-6)
