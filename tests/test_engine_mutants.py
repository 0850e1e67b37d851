"""Mutation-testing gaps of the training engine (loop, state, optim, logs, resume): most tests
here fail on a one-line change (a mutant) that the rest of the suite let pass; a few check at
unit level what was only seen through whole training runs."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_state(*, lr: float = 1.0, accum_steps: int = 1, clip_grad=None, scale: float = 0.0, **kwargs):
    """A ``TrainState`` of a linear model, plain SGD; an enabled fp16 ``GradScaler`` (CPU) at
    ``scale`` when given."""
    from sanet.engine.loop import TrainState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=True) if scale \
        else torch.amp.GradScaler("cpu", enabled=False)
    return TrainState(model=model, raw=model, ddp=None, optimizer=opt, scheduler=None,
                      loss_fn=nn.CrossEntropyLoss(), scaler=scaler, accum_steps=accum_steps,
                      clip_grad=clip_grad, **kwargs)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def _epoch(state, batches, epoch: int = 0):
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import train_one_epoch

    return train_one_epoch(state, batches, DistContext(), epoch, epoch + 1, progress=False)


def _batch(n: int = 4, scale: float = 1.0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 3, 2, 2, generator=g), torch.arange(n) % 3


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient: a finite loss whose fp16 backward overflowed."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


# --------------------------------------------------------------------------- fp16 GradScaler
def test_fp16_update_equals_the_unscaled_one():
    """The scaled loss's gradients reach the optimizer divided by the scale again (through
    ``scaler.step``): the same weights as a run without a scaler."""
    x, y = _batch()
    plain, scaled = _linear_state(lr=0.1), _linear_state(lr=0.1, scale=2.0 ** 10)
    _epoch(plain, [(x, y, 0)])
    _epoch(scaled, [(x, y, 0)])
    torch.testing.assert_close(_flat(scaled.raw), _flat(plain.raw))
    assert scaled.scaler.get_scale() == 2.0 ** 10  # finite gradients: the scale is kept


def test_fp16_clipping_bounds_the_unscaled_gradient():
    """--clip-grad C under a GradScaler: the gradients are unscaled before clipping, so an
    update at lr 1 moves the weights by exactly C (not C / scale)."""
    x, y = _batch(scale=100.0)
    state = _linear_state(lr=1.0, clip_grad=0.01, scale=2.0 ** 10)
    before = _flat(state.raw)
    _epoch(state, [(x, y, 0)])
    assert (_flat(state.raw) - before).norm().item() == pytest.approx(0.01, rel=1e-4)


def test_fp16_overflow_skips_the_update_and_backs_the_scale_off():
    """Infinite gradients from a finite loss: the scaler skips that step (weights unchanged)
    and halves its scale; the next micro-batch trains at the new scale."""
    x, y = _batch()
    state = _linear_state(lr=0.1, scale=2.0 ** 10)
    real_loss = state.loss_fn
    calls = {"n": 0}

    def loss_fn(logits, target):
        calls["n"] += 1
        return real_loss(_InfGrad.apply(logits) if calls["n"] == 1 else logits, target)

    state.loss_fn = loss_fn
    before = _flat(state.raw)
    _epoch(state, [(x, y, 0)])
    assert torch.equal(_flat(state.raw), before)
    assert state.scaler.get_scale() == 2.0 ** 9
    _epoch(state, [(x, y, 0)], epoch=1)
    assert not torch.equal(_flat(state.raw), before) and state.scaler.get_scale() == 2.0 ** 9


# --------------------------------------------------------------------------- the loss guard
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_loss_stops_before_backward(bad):
    from sanet.engine.loop import NonFiniteLossError

    state = _linear_state(lr=0.1)
    real_loss = state.loss_fn
    state.loss_fn = lambda logits, target: real_loss(logits, target) * bad
    before = _flat(state.raw)
    with pytest.raises(NonFiniteLossError, match=rf"loss is {bad} at epoch 1, step 1/1 \(optimizer update 1\)"):
        _epoch(state, [(*_batch(), 0)])
    assert torch.equal(_flat(state.raw), before) and state.updates == 0
    assert all(p.grad is None for p in state.raw.parameters())


# --------------------------------------------------------------------------- skipped micro-batches
def test_a_group_with_no_usable_micro_batch_makes_no_update():
    """A micro-batch left with one readable image is skipped; when it is its group's only one,
    there is nothing to apply: no optimizer update, schedule step or EMA update."""
    from types import SimpleNamespace

    steps, ema = [], []
    sched = SimpleNamespace(step_update=lambda num_updates: steps.append(num_updates))
    state = _linear_state(lr=0.1, ema=SimpleNamespace(update=lambda model, step: ema.append(step)))
    state.scheduler = sched
    x, y = _batch()
    row = _epoch(state, [(x, y, 0), (x[:1], y[:1], 3), (x, y, 0)])
    assert state.updates == 2 and steps == [1, 3] and ema == [1, 2]
    assert (row["train_images"], row["train_skipped"]) == (8, 3)


def test_train_images_counts_what_mixup_trained_on():
    """An odd micro-batch loses an image before mixup: it is not counted as trained on."""
    state = _linear_state(lr=0.0, mixup=lambda x, y: (x, y))
    x, y = _batch(5)
    row = _epoch(state, [(x, y, 0)])
    assert row["train_images"] == 4


# --------------------------------------------------------------------------- seeding
def test_seed_epoch_reseeds_python_numpy_and_torch():
    """timm's augmentations draw from Python's random, Mixup from NumPy's: each epoch's
    draws of all three follow from (seed, epoch, rank)."""
    from sanet.engine.state import seed_epoch

    def draw(*key):
        seed_epoch(*key)
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    first = draw(3, 1, 0)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert draw(3, 1, 0) == first
    other = draw(3, 2, 0)
    assert all(a != b for a, b in zip(first, other))


# --------------------------------------------------------------------------- accumulation groups
def _fp64_epoch(batches, accum_steps: int) -> nn.Module:
    state = _linear_state(lr=0.5, accum_steps=accum_steps)
    state.raw.double()
    _epoch(state, [(x.double(), y, skipped) for x, y, skipped in batches])
    return state.raw


def test_each_update_applies_only_its_own_groups_gradient():
    """Plain SGD, accum 1: the 2nd update moves the weights by lr x the 2nd batch's gradient
    alone (the gradients are zeroed after each step, not summed over the epoch)."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import train_one_epoch

    (x1, y1), (x2, y2) = _batch(seed=1), _batch(seed=2)
    state = _linear_state(lr=0.5)
    train_one_epoch(state, [(x1, y1, 0)], DistContext(), 0, 2, progress=False)
    middle = _flat(state.raw)
    state.raw.zero_grad()
    nn.functional.cross_entropy(state.raw(x2), y2).backward()
    want = middle - 0.5 * torch.cat([p.grad.flatten() for p in state.raw.parameters()])
    state.raw.zero_grad()
    fresh = _linear_state(lr=0.5)
    _epoch(fresh, [(x1, y1, 0), (x2, y2, 0)])
    torch.testing.assert_close(_flat(fresh.raw), want)


def test_gradients_left_before_the_epoch_are_not_applied():
    """``train_one_epoch`` starts from zeroed gradients: a caller's stray backward (or one
    of a micro-batch before a stopped step) does not leak into its first update."""
    x, y = _batch()
    clean, stale = _linear_state(lr=0.5), _linear_state(lr=0.5)
    nn.functional.cross_entropy(stale.raw(3 * x), y).backward()
    _epoch(clean, [(x, y, 0)])
    _epoch(stale, [(x, y, 0)])
    torch.testing.assert_close(_flat(stale.raw), _flat(clean.raw))


def test_a_skipped_micro_batch_in_a_later_group_is_made_up_for():
    """accum 2 over A, B | C (one readable image: skipped), D: the 2nd update is D's gradient
    alone (scaled up to the mean over the micro-batches used), as accum 1 over A+B, D."""
    torch.manual_seed(3)
    a, b, d = (_batch(seed=s) for s in (4, 5, 6))
    accum = _fp64_epoch([(*a, 0), (*b, 0), (a[0][:1], a[1][:1], 3), (*d, 0)], 2)
    ref = _fp64_epoch([(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), 0), (*d, 0)], 1)
    torch.testing.assert_close(_flat(accum), _flat(ref), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- optimizer, schedule, mixup
@pytest.mark.parametrize("no_wd_norm", [False, True])
def test_momentum_reaches_every_param_group(no_wd_norm):
    """--momentum is not timm's default (0.9) in disguise: 0.5 arrives in each group."""
    import timm

    import sanet  # noqa: F401
    from sanet.engine.optim import build_optimizer

    model = timm.create_model("sa_resnet_test", num_classes=3)
    opt = build_optimizer(model, "momentum", lr=0.1, weight_decay=1e-4, momentum=0.5, no_wd_norm=no_wd_norm)
    assert [g["momentum"] for g in opt.param_groups] == [0.5] * (1 + no_wd_norm)


def test_schedule_takes_decay_rate_warmup_lr_and_min_lr():
    """Non-default values (timm's are 0.1, 1e-5 and 0): --decay-rate halves at each decay
    epoch; a cosine run starts its warmup at --warmup-lr and ends at --min-lr."""
    from sanet.engine.optim import build_scheduler

    def lrs(sched, **kw):
        opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
        s = build_scheduler(opt, sched, epochs=3, updates_per_epoch=2, decay_epochs=1, **kw)
        out = []
        for t in range(7):
            s.step_update(num_updates=t)
            out.append(opt.param_groups[0]["lr"])
        return out

    step = lrs("step", decay_rate=0.5, warmup_epochs=0, warmup_lr=0.01, min_lr=0.0)
    assert step[:6] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    cosine = lrs("cosine", decay_rate=0.1, warmup_epochs=1, warmup_lr=0.01, min_lr=0.02)
    assert cosine[0] == pytest.approx(0.01) and cosine[6] == pytest.approx(0.02)
    assert min(cosine[1:]) == pytest.approx(0.02) and max(cosine) < 0.1


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_mixup_targets_use_this_runs_smoothing(smoothing):
    """Mixup smooths its targets with --smoothing, not timm's default 0.1: a batch of one
    class mixed into itself is that class's one-hot, smoothed by exactly --smoothing."""
    from sanet.engine.optim import build_mixup

    mixup = build_mixup(mixup=0.2, cutmix=0.0, prob=1.0, switch_prob=0.0, smoothing=smoothing, num_classes=3)
    np.random.seed(0)
    _, targets = mixup(torch.randn(4, 3, 4, 4), torch.zeros(4, dtype=torch.long))
    off = smoothing / 3
    torch.testing.assert_close(targets, torch.tensor([1 - smoothing + off, off, off]).expand(4, 3))


def test_cutmix_alone_turns_mixing_on():
    from sanet.engine.optim import build_mixup

    assert build_mixup(mixup=0.0, cutmix=0.0, prob=1.0, switch_prob=0.5, smoothing=0.1, num_classes=3) is None
    assert build_mixup(mixup=0.0, cutmix=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1, num_classes=3) is not None


def test_the_lr_is_scaled_to_the_global_batch_of_all_processes():
    """lr_base x batch x processes x accum-steps / lr_base_size, under torchrun too."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.trainer import _build_state
    from engine_utils import parse_train_args

    args = parse_train_args("--batch-size", "4", "--accum-steps", "3", "--lr-base", "0.2", "--lr-base-size", "128")
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    state = _build_state(args, model, DistContext(world_size=2), 3, 10)
    assert args.global_batch == 4 * 2 * 3
    assert args.lr_resolved == pytest.approx(0.2 * 24 / 128)
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 24 / 128)


# --------------------------------------------------------------------------- resume
def test_resume_restores_scaler_ema_updates_and_schedule_position(capsys):
    """What ``_resume`` puts back from a checkpoint: the fp16 loss scale, the EMA weights, the
    update count and the schedule at the checkpoint's epoch."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.trainer import _build_state, _checkpoint, _resume
    from engine_utils import parse_train_args

    argv = ("--amp", "fp16", "--model-ema", "--sched", "step", "--decay-epochs", "1", "--lr", "0.1")

    def build():
        torch.manual_seed(0)
        args = parse_train_args(*argv)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        return args, _build_state(args, model, DistContext(), 3, 5)

    args, saved = build()
    saved.scaler.scale(torch.ones(1))  # (the scale is made at first use)
    saved.scaler.update(new_scale=128.0)
    with torch.no_grad():
        for p in saved.ema.module.parameters():
            p.add_(1.0)
    saved.updates = 7  # not 2 epochs x 5: the schedule follows the epoch
    ckpt = _checkpoint(args, saved, 2, 50.0, 2, ["a", "b", "c"], [])
    args, resumed = build()
    assert resumed.scaler.get_scale() != 128.0 and resumed.updates == 0
    _resume(args, ckpt, resumed, DistContext(), 5)
    assert resumed.scaler.get_scale() == 128.0 and resumed.updates == 7
    for a, b in zip(resumed.ema.module.state_dict().values(), saved.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1 ** 2)  # 2 epochs done


# --------------------------------------------------------------------------- logs
def test_run_log_csv_and_tensorboard_tags(tmp_path):
    """log.csv holds every epoch and every column (a later row may add one: a resume of an
    older run); TensorBoard files lr with train/, counts (ints) too, and not the epoch."""
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sanet.engine.logs import RunLogger

    rows = [{"epoch": 1, "train_loss": 2.0, "lr": 0.1, "val_top1": 10.0},
            {"epoch": 2, "train_loss": 1.5, "lr": 0.01, "val_top1": 20.0, "val_images": 12}]
    logger = RunLogger(tmp_path, 0)
    logger.log_epoch(rows[:1])
    logger.log_epoch(rows)
    logger.close()
    with open(tmp_path / "log.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["epoch"] for r in got] == ["1", "2"]
    assert list(got[0]) == ["epoch", "train_loss", "lr", "val_top1", "val_images"]
    assert got[0]["val_images"] == "" and got[1]["val_images"] == "12" and got[1]["lr"] == "0.01"
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/train_loss", "train/lr", "val/val_top1", "val/val_images"}
    assert [(e.step, e.value) for e in acc.Scalars("train/lr")] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.01))]


def test_resume_refuses_the_same_classes_in_another_order(tmp_path):
    """Labels are class indices: a checkpoint whose classes are in another order (made by
    another tool or sort) would train every image under another class's label."""
    from sanet.engine.state import load_resume_checkpoint

    ckpt = {"model": {}, "epoch": 1, "arch": "sa_resnet_test", "class_names": ["b", "a", "c"]}
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"trained on 3 classes \['b', 'a', 'c'\], but --data has 3"):
        load_resume_checkpoint(tmp_path, "sa_resnet_test", ["a", "b", "c"])
    assert load_resume_checkpoint(tmp_path, "sa_resnet_test", ["b", "a", "c"])["epoch"] == 1


def test_mixup_resume_equals_uninterrupted(capsys, tmp_path, data, monkeypatch):
    """Mixup draws from NumPy's generator and drop-path from torch's: each epoch reseeds them,
    so the epoch after a resume mixes as the uninterrupted run does."""
    from engine_utils import load_ckpt, straight_and_resumed_runs

    def scramble():  # whatever the process did before the resume
        np.random.seed(123), torch.manual_seed(123), random.seed(123)

    common = ("--deterministic", "--mixup", "0.4", "--drop-path", "0.2")
    straight, split = straight_and_resumed_runs(capsys, monkeypatch, data, tmp_path, *common, before_resume=scramble)
    a, b = load_ckpt(straight / "last.pt")["model"], load_ckpt(split / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
