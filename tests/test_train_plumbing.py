"""How ``sanet train``'s options reach the engine (mixup, smoothing, clipping, AMP scaler),
the schedule clock under accumulation, the loss average, the odd-batch trim before mixup,
the train loader's partial batch and TensorBoard's purge on resume: unit level, no run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine_utils import parse_train_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(*argv: str, model: nn.Module = None, updates_per_epoch: int = 10):
    """``_build_state`` as ``sanet train ARGV`` builds it, on a small linear model."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.trainer import _build_state

    args = parse_train_args(*argv)
    model = model if model is not None else nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    return args, _build_state(args, model, DistContext(), 3, updates_per_epoch)


def _linear_state(accum_steps=1, scheduler=None, lr=0.0):
    from sanet.engine.loop import TrainState

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return TrainState(model=model, raw=model, ddp=None, optimizer=opt, scheduler=scheduler,
                      loss_fn=nn.CrossEntropyLoss(), scaler=torch.amp.GradScaler("cpu", enabled=False),
                      accum_steps=accum_steps)


# --------------------------------------------------------------------------- options -> state
def test_smoothing_reaches_the_mixed_targets():
    """Under mixup the loss is soft-target CE: --smoothing lives in Mixup's targets only. A
    batch of one class mixes into itself, leaving the smoothed one-hot."""
    eps = 0.1
    _, state = _state("--mixup", "0.2", "--smoothing", str(eps))
    np.random.seed(0)
    _, targets = state.mixup(torch.randn(4, 3, 4, 4), torch.zeros(4, dtype=torch.long))
    off = eps / 3
    want = torch.tensor([1 - eps + off, off, off]).expand(4, 3)
    torch.testing.assert_close(targets, want)
    assert type(state.loss_fn).__name__ == "SoftTargetCrossEntropy"


def test_mixup_prob_and_switch_prob_are_not_swapped():
    """--mixup-prob 0: no batch is mixed, whatever the switch probability; --mixup-prob 1 with
    --mixup-switch-prob 0: every batch is mixed, and by mixup (a blend: an image of constant
    value stays constant), never cutmix (a pasted box: two values)."""
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()  # image i is all i
    labels = torch.tensor([0, 1, 2, 0])
    mixup = ("--mixup", "0.2", "--cutmix", "1.0")
    np.random.seed(0)
    _, never = _state(*mixup, "--mixup-prob", "0", "--mixup-switch-prob", "1")
    for _ in range(5):
        x, y = never.mixup(images.clone(), labels)
        assert torch.equal(x, images) and torch.equal(y, nn.functional.one_hot(labels, 3).float())
    _, always = _state(*mixup, "--mixup-prob", "1", "--mixup-switch-prob", "0")
    for _ in range(5):
        x, _ = always.mixup(images.clone(), labels)
        assert not torch.equal(x, images)
        assert all(img.unique().numel() == 1 for img in x)  # blended, not cut


def test_clip_grad_bounds_each_update():
    """--clip-grad C with plain SGD at lr 1: each update moves the weights by exactly C (the
    gradient here is far larger)."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import train_one_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    _, state = _state("--clip-grad", "0.01", "--lr", "1", "--momentum", "0", "--weight-decay", "0",
                      model=model)
    assert state.scheduler is not None and state.optimizer.param_groups[0]["lr"] == 1.0
    x, y = 100 * torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    model.zero_grad()
    assert grad_norm > 1.0  # so an unclipped update would move them by that
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_one_epoch(state, [(x, y, 0)], DistContext(), 0, 1, progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("amp, scales", [("bf16", False), ("fp16", True), ("none", False)])
def test_only_fp16_uses_a_grad_scaler(amp, scales):
    """bf16 has fp32's exponent range: nothing to scale, and its checkpoint holds no scaler."""
    from sanet.engine.trainer import _checkpoint

    args, state = _state("--amp", amp)
    assert state.scaler.is_enabled() is scales
    ckpt = _checkpoint(args, state, 1, 50.0, 1, ["a", "b", "c"], [])
    assert (ckpt["scaler"] is not None) is scales


def test_label_smoothing_without_mixup():
    """--smoothing e: (1 - e) x the true class's -log p plus e x the mean -log p of all classes."""
    from sanet.engine.optim import build_train_loss

    logits, target = torch.tensor([[4.0, 0.0, -1.0], [0.5, 2.0, 0.0]]), torch.tensor([0, 2])
    logp = torch.log_softmax(logits, dim=1)
    nll, uniform = -logp[torch.arange(2), target], -logp.mean(dim=1)
    for eps in (0.1, 0.3):
        loss = build_train_loss(mixup_active=False, smoothing=eps)
        torch.testing.assert_close(loss(logits, target), ((1 - eps) * nll + eps * uniform).mean())
    plain = build_train_loss(mixup_active=False, smoothing=0.0)
    torch.testing.assert_close(plain(logits, target), nll.mean())


# --------------------------------------------------------------------------- the loop
def test_step_schedule_with_accumulation_not_dividing_the_epoch():
    """5 micro-batches, accum 2: 3 updates per epoch (the last group is one micro-batch), so
    --decay-epochs 1 divides the lr by 10 at each epoch start, not later and later."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import train_one_epoch
    from sanet.engine.optim import build_scheduler

    base = 0.05
    state = _linear_state(accum_steps=2, lr=base)
    state.scheduler = build_scheduler(state.optimizer, "step", epochs=3, updates_per_epoch=3, decay_epochs=1,
                                      decay_rate=0.1, warmup_epochs=0, warmup_lr=1e-5, min_lr=0.0)
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,)), 0) for _ in range(5)]
    lrs = [train_one_epoch(state, batches, DistContext(), epoch, 3, progress=False)["lr"] for epoch in range(3)]
    assert lrs == pytest.approx([base, base / 10, base / 100])
    assert state.updates == 9
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(base / 1000)  # the next epoch's


def test_train_loss_averages_the_batches_trained_on():
    """A micro-batch left with one readable image is skipped: it is not part of the mean."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import train_one_epoch

    state = _linear_state(lr=0.0)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    row = train_one_epoch(state, [(x, y, 0), (x[:1], y[:1], 3)], DistContext(), 0, 1, progress=False)
    want = nn.functional.cross_entropy(state.model(x), y).item()  # lr 0: the weights are those used
    assert row["train_loss"] == pytest.approx(want, rel=1e-6)
    assert (row["train_images"], row["train_skipped"]) == (4, 3)


def test_odd_batch_before_mixup_keeps_each_image_with_its_target():
    """timm's Mixup pairs images; an odd micro-batch (after skipped images) loses one image,
    and every image left must keep its own target."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import _batch

    state = _linear_state()
    state.mixup = lambda x, y: (x, y)  # shows what Mixup is handed
    images = torch.arange(5.0).view(5, 1, 1, 1)  # image i is of class i
    x, y = _batch(images, torch.arange(5), state, DistContext())
    assert len(x) == 4 and x.flatten().long().tolist() == y.tolist()


def test_train_loader_drops_the_last_partial_batch():
    """27 images at batch 4: 6 batches of 4 (a batch of 3, or of 1, is not trained on)."""
    from sanet.engine.data import build_train_loader, reseed_loader
    from sanet.engine.distributed import DistContext

    dataset = [(torch.full((1,), float(i)), i % 3) for i in range(27)]
    loader = build_train_loader(dataset, 4, workers=0, ctx=DistContext(), seed=0)
    reseed_loader(loader, 0, 0)
    sizes = [len(targets) for _, targets, _ in loader]
    assert len(loader) == 27 // 4 and sizes == [4] * (27 // 4)


# --------------------------------------------------------------------------- TensorBoard
def _tb_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_resume_drops_only_the_redone_epochs(tmp_path, monkeypatch):
    """A run killed after logging epoch 2 but before its last.pt resumes at epoch 2: the
    redone epoch's old events go, epoch 1's (committed) stay."""
    from tensorboard.summary.writer import event_file_writer

    from sanet.engine.logs import RunLogger

    # event files are read in name order, and their names count writers per process: from 0
    # here, so that "10" can't sort before "9" when both are made in the same second
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))
    rows = [{"epoch": 1, "val_top1": 10.0}, {"epoch": 2, "val_top1": 99.0}]
    first = RunLogger(tmp_path, 0)
    first.log_epoch(rows[:1])
    first.log_epoch(rows)  # killed after this, before last.pt: epoch 2 is redone
    first.close()
    resumed = RunLogger(tmp_path, 1)
    resumed.log_epoch([rows[0], {"epoch": 2, "val_top1": 20.0}])
    resumed.close()
    assert _tb_scalars(tmp_path / "tb", "val/val_top1") == [(1, 10.0), (2, 20.0)]
