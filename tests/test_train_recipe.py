"""The training loop's arithmetic: gradient accumulation, its schedule clock, EMA resume, how
best.pt is chosen, per-epoch reseeding, and what atomic_write promises."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from engine_utils import load_ckpt, parse_train_args, run_cli, straight_and_resumed_runs, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- accumulation
def _linear_epoch(batches, accum_steps: int) -> nn.Module:
    """One epoch of ``train_one_epoch`` over ``batches`` with a BatchNorm-free fp64 model (so
    micro-batches and the full batch see the same function), SGD with momentum and decay."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import TrainState, train_one_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    state = TrainState(model=model, raw=model, ddp=None, optimizer=opt, scheduler=None,
                       loss_fn=nn.CrossEntropyLoss(), scaler=torch.amp.GradScaler("cpu", enabled=False),
                       accum_steps=accum_steps)
    train_one_epoch(state, [(x, y, 0) for x, y in batches], DistContext(), 0, 1, progress=False)
    assert state.updates == -(-len(batches) // accum_steps)
    return model


def _split(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_accumulated_micro_batches_equal_one_full_batch():
    """accum 2 over micro-batches of 4 = accum 1 over batches of 8; a trailing odd micro-batch
    is a group of its own (its loss divided by 1, not 2)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    full = _linear_epoch(_split(x[:16], y[:16], 8) + [(x[16:], y[16:])], 1)  # 8, 8, 4
    accum = _linear_epoch(_split(x, y, 4), 2)  # groups: 4+4, 4+4, 4
    for a, b in zip(full.parameters(), accum.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    single = _linear_epoch(_split(x, y, 4), 1)  # negative control: 5 updates, not 3
    assert not torch.allclose(single[1].weight, full[1].weight, atol=1e-4)


def test_accumulation_scales_the_lr_and_keeps_the_schedule_in_updates(capsys, tmp_path, data):
    """24 images, batch 4, accum 2: 3 updates per epoch and a global batch of 8 (lr 0.1 x 8/256).
    The step schedule must count optimizer updates: one decay per epoch, not two."""
    out = tmp_path / "run"
    argv = train_argv(data, out, "--accum-steps", "2", "--sched", "step", "--decay-epochs", "1", epochs=3)
    assert run_cli(capsys, argv)[0] == 0
    ckpt = load_ckpt(out / "last.pt")
    base = 0.1 * 8 / 256
    assert ckpt["args"]["lr_resolved"] == pytest.approx(base) and ckpt["args"]["global_batch"] == 8
    assert ckpt["updates"] == 9
    assert [row["lr"] for row in ckpt["history"]] == pytest.approx([base, base / 10, base / 100])
    assert ckpt["scheduler"] is not None


# --------------------------------------------------------------------------- EMA
def test_ema_resume_with_accumulation_equals_uninterrupted(capsys, tmp_path, data, monkeypatch):
    common = ("--deterministic", "--model-ema", "--model-ema-decay", "0.9", "--accum-steps", "2")
    straight, split = straight_and_resumed_runs(capsys, monkeypatch, data, tmp_path, *common)
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(split / "last.pt")
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert not all(torch.equal(a["model"][k], a["model_ema"][k]) for k in a["model"])  # EMA is its own


def _fake_validate(scores):
    """A ``_validate`` that reports the given (model top-1, EMA top-1 or None) per epoch."""
    epochs = iter(scores)

    def validate(state, loader, ctx, args, progress):
        model, ema = next(epochs)
        row = dict(val_loss=1.0, val_top1=model, val_top5=100.0, val_images=12, val_skipped=0)
        if ema is not None:
            row.update(val_loss_ema=1.0, val_top1_ema=ema, val_top5_ema=100.0)
        return row
    return validate


@pytest.mark.parametrize("scores, flags, best_epoch, best", [
    ([(10.0, 30.0), (50.0, 20.0), (20.0, 40.0)], ("--model-ema",), 3, 40.0),  # by the EMA's top-1
    ([(10.0, None), (50.0, None), (20.0, None)], (), 2, 50.0),
    ([(50.0, None), (50.0, None)], (), 1, 50.0),  # a tie keeps the earlier epoch
])
def test_best_checkpoint_follows_the_right_top1(capsys, tmp_path, data, monkeypatch, scores, flags,
                                                best_epoch, best):
    import sanet.engine.trainer as trainer

    monkeypatch.setattr(trainer, "_validate", _fake_validate(scores))
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, *flags, epochs=len(scores)))[0] == 0
    last = load_ckpt(out / "last.pt")
    assert (last["best_epoch"], last["best_top1"]) == (best_epoch, best)
    assert load_ckpt(out / "best.pt")["epoch"] == best_epoch


def test_resume_keeps_the_best_of_the_epochs_before_it(capsys, tmp_path, data, monkeypatch):
    """Epoch 1 scores 50, epoch 2 (after --resume) 10: best.pt stays epoch 1's. The summary's
    last_* are the last epoch's metrics, each from its own key."""
    import json

    import sanet.engine.trainer as trainer

    monkeypatch.setattr(trainer, "_validate", _fake_validate([(50.0, None), (10.0, None)]))
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, epochs=1))[0] == 0
    code, stdout, _ = run_cli(capsys, train_argv(data, out, "--resume", "--json", epochs=2))
    assert code == 0
    last = load_ckpt(out / "last.pt")
    assert (last["epoch"], last["best_epoch"], last["best_top1"]) == (2, 1, 50.0)
    assert load_ckpt(out / "best.pt")["epoch"] == 1
    summary = json.loads(stdout)
    assert (summary["best_epoch"], summary["best_top1"]) == (1, 50.0)
    row = last["history"][-1]
    assert (summary["last_top1"], summary["last_top5"], summary["last_loss"]) == \
        (row["val_top1"], row["val_top5"], row["val_loss"]) == (10.0, 100.0, 1.0)


# --------------------------------------------------------------------------- reseeding
def _epoch_batches(loader, epoch: int, seed: int):
    from sanet.engine.data import reseed_loader

    reseed_loader(loader, epoch, seed)
    return [(images.clone(), targets.clone()) for images, targets, _ in loader]


def test_each_epoch_has_its_own_order_and_augmentation_and_reruns_repeat_them(data):
    from sanet.engine.data import build_train_loader, build_transform, open_train_val, reseed_loader
    from sanet.engine.distributed import DistContext

    train, _ = open_train_val(data)
    cfg = dict(input_size=(3, 16, 16), interpolation="bilinear", crop_pct=0.875,
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    train.transform = build_transform(cfg, is_training=True)
    loader = build_train_loader(train, 4, workers=0, ctx=DistContext(), seed=3)
    e0, e1, e0_again = (_epoch_batches(loader, e, 3) for e in (0, 1, 0))
    assert [t.tolist() for _, t in e0] != [t.tolist() for _, t in e1]  # another order
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, e0_again))
    other_seed = _epoch_batches(loader, 0, 4)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(e0, other_seed))
    crops = []  # one image's random crop/flip: a function of (seed, epoch)
    for epoch in (0, 1, 0):
        reseed_loader(loader, epoch, 3)
        crops.append(train[5][0])
    assert torch.equal(crops[0], crops[2]) and not torch.equal(crops[0], crops[1])


def test_seed_epoch_depends_on_seed_epoch_and_rank():
    from sanet.engine.state import seed_epoch

    def draw(*key):
        seed_epoch(*key)
        return torch.rand(4)

    base = draw(0, 1, 0)
    assert torch.equal(base, draw(0, 1, 0))
    for other in ((0, 2, 0), (0, 1, 1), (1, 1, 0)):
        assert not torch.equal(base, draw(*other)), other


# --------------------------------------------------------------------------- atomic_write
def test_atomic_write_syncs_file_and_folder_then_replaces(tmp_path, monkeypatch):
    import sanet.checkpoint as ckpt_mod

    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                      else None))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    path = tmp_path / "sub" / "out.bin"
    ckpt_mod.atomic_write(path, lambda tmp: open(tmp, "wb").write(b"payload"))
    assert path.read_bytes() == b"payload"
    # the data reaches the disk before the rename, and the rename itself after it
    assert calls == [("fsync", False), ("replace", "out.bin"), ("fsync", True)]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]  # no temporary left


# --------------------------------------------------------------------------- the defaults
def test_defaults_are_the_authors_recipe():
    """SA-NET.md section 3 (the PyTorch ImageNet script): SGD momentum 0.9, lr 0.1 per 256
    images, weight decay 1e-4 on every parameter, / 10 every 30 epochs, 90 epochs."""
    from sanet.engine.optim import build_optimizer, build_scheduler, resolve_lr

    args = parse_train_args(model="sa_resnet50")
    assert (args.opt, args.momentum, args.weight_decay, args.epochs, args.sched) == ("momentum", 0.9, 1e-4, 90, "step")
    assert not args.no_wd_norm and args.lr is None
    lr = resolve_lr(args.lr, args.lr_base, args.lr_base_size, 256)
    assert lr == pytest.approx(0.1)
    opt = build_optimizer(nn.Linear(2, 2), args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                          no_wd_norm=args.no_wd_norm)
    assert isinstance(opt, torch.optim.SGD) and not opt.defaults["nesterov"]
    sched = build_scheduler(opt, args.sched, epochs=args.epochs, updates_per_epoch=10,
                            decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                            warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr)
    at = {}
    for epoch in (0, 29, 30, 59, 60, 89):
        sched.step_update(num_updates=epoch * 10)
        at[epoch] = opt.param_groups[0]["lr"]
    assert at == pytest.approx({0: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 0.001, 89: 0.001})


def test_model_ema_decay_reaches_the_ema(capsys, tmp_path, data):
    """--model-ema-decay D: timm's first update copies the model (its decay is 0 at step 1),
    every later one is D * ema + (1 - D) * model (no warmup by default)."""
    out = tmp_path / "run"
    argv = ("--model-ema", "--model-ema-decay", "0.5", "--lr", "0.05", "--accum-steps", "6")  # 1 update/epoch
    assert run_cli(capsys, train_argv(data, out, *argv))[0] == 0
    first = load_ckpt(out / "last.pt")
    assert first["updates"] == 1
    w = "fc.weight"
    assert torch.equal(first["model_ema"][w], first["model"][w])
    assert run_cli(capsys, train_argv(data, out, *argv, "--resume", epochs=2))[0] == 0
    second = load_ckpt(out / "last.pt")
    assert second["updates"] == 2 and not torch.equal(second["model"][w], first["model"][w])
    torch.testing.assert_close(second["model_ema"][w], 0.5 * first["model"][w] + 0.5 * second["model"][w])
