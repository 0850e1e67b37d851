"""``sanet train``: outputs, resume, recipe options and clear errors (tiny data, in-process)."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

import sanet
from engine_utils import load_ckpt, make_imagefolder, run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path):
    return load_ckpt(path)["model"]


def test_train_writes_checkpoints_logs_and_curves(capsys, tmp_path, data):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, train_argv(data, out, "--json", epochs=2))
    assert code == 0
    summary = json.loads(stdout)  # stdout is the JSON object alone; epoch lines go to stderr
    assert "epoch   2/2" in err
    assert summary["epochs"] == 2 and 0 <= summary["best_top1"] <= 100 and summary["best_of"] == "model"
    ckpt = load_ckpt(out / "last.pt")  # weights_only=True
    for key in ("model", "optimizer", "scheduler", "epoch", "args", "class_names", "history", "updates"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["class_names"] == ["a", "b", "c"]
    assert ckpt["updates"] == 2 * (24 // 4)
    assert ckpt.get("sanet_version") == sanet.__version__ and ckpt.get("torch_version") == str(torch.__version__)
    assert ckpt["arch"] == "sa_resnet_test"
    last = ckpt["history"][-1]  # the summary's last_* are the last epoch's, each its own
    assert [summary[k] for k in ("last_top1", "last_top5", "last_loss")] == \
        [last["val_top1"], last["val_top5"], last["val_loss"]]
    args = ckpt["args"]
    assert args["model"] == "sa_resnet_test" and args["img_size"] == 16 and args["data"] == str(data)
    assert args["lr_resolved"] == pytest.approx(0.1 * 4 / 256)  # 0.1 per 256 images, scaled
    assert ckpt["model"]["fc.weight"].shape == (3, 256)
    assert all(s["momentum_buffer"] is not None for s in ckpt["optimizer"]["state"].values())
    best = load_ckpt(out / "best.pt")
    assert best["epoch"] == ckpt["best_epoch"]
    assert best["history"][-1]["val_top1"] == ckpt["best_top1"]
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["val_top1"]) == pytest.approx(ckpt["history"][-1]["val_top1"])
    assert int(rows[-1]["val_images"]) == 12
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes files


@pytest.mark.parametrize("opt, batch", [("momentum", 4), ("lookahead_momentum", 5)])
def test_resume_continues_and_equals_uninterrupted(capsys, tmp_path, data, monkeypatch, opt, batch):
    """lookahead_momentum at 4 updates per epoch: timm's Lookahead counts its steps in the
    param group (a sync every 6), and a resume that reset the count synced at other steps."""
    import sanet.engine.trainer as trainer

    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--deterministic", "--sched", "cosine", "--warmup-epochs", "1", "--lr", "0.05", "--opt", opt,
              "--batch-size", str(batch))
    assert run_cli(capsys, train_argv(data, straight, *common, epochs=3))[0] == 0

    real_save = trainer.save_training_checkpoint

    def save_then_die(*args, **kwargs):  # the run is interrupted right after epoch 1's checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_training_checkpoint", save_then_die)
    assert run_cli(capsys, train_argv(data, split, *common, epochs=3))[0] == 130
    monkeypatch.setattr(trainer, "save_training_checkpoint", real_save)
    assert load_ckpt(split / "last.pt")["epoch"] == 1
    code, stdout, _ = run_cli(capsys, train_argv(data, split, *common, "--resume", epochs=3))
    assert code == 0 and "resumed" in stdout
    a, b = _weights(straight / "last.pt"), _weights(split / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = load_ckpt(split / "last.pt")
    assert resumed["epoch"] == 3 and [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    metrics = ("train_loss", "val_loss", "val_top1", "lr")
    assert [[r[k] for k in metrics] for r in resumed["history"]] == \
        [[r[k] for k in metrics] for r in load_ckpt(straight / "last.pt")["history"]]
    with open(split / "log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_resume_can_extend_the_run(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, epochs=1))[0] == 0
    assert run_cli(capsys, train_argv(data, out, "--resume", epochs=2))[0] == 0
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["updates"] == 12


def test_resume_with_fewer_epochs_trains_nothing_without_a_schedule_warning(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, "--sched", "cosine", epochs=2))[0] == 0
    code, stdout, err = run_cli(capsys, train_argv(data, out, "--sched", "cosine", "--resume", epochs=1))
    assert code == 0 and "warning: " in err and "nothing to train" in err and "warning" not in stdout
    assert "schedule is now drawn" not in err  # (it warned of a jump at an epoch never trained)


def test_resume_with_another_batch_size_keeps_the_schedule(capsys, tmp_path, data):
    """The step schedule is a function of epochs: after 2 epochs of 6 updates, a resume at 3
    updates per epoch must still be past exactly one decay (lr / 10), not two."""
    out = tmp_path / "run"
    step = ("--decay-epochs", "2", "--lr", "0.01")
    assert run_cli(capsys, train_argv(data, out, *step, epochs=2, batch=4))[0] == 0
    code, _, err = run_cli(capsys, train_argv(data, out, *step, "--resume", epochs=3, batch=8))
    assert code == 0 and "batch_size (4 -> 8)" in err and "global_batch (4 -> 8)" in err
    lrs = [row["lr"] for row in load_ckpt(out / "last.pt")["history"]]
    assert lrs == pytest.approx([0.01, 0.01, 0.001])


def test_resume_keeps_or_refuses_ema(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, "--model-ema", epochs=1))[0] == 0
    code, _, err = run_cli(capsys, train_argv(data, out, "--resume", epochs=2))
    assert code == 2 and "trained with --model-ema; resume it with --model-ema" in err
    assert load_ckpt(out / "last.pt")["model_ema"] is not None  # nothing thrown away
    # fine-tuning from it says whose weights it starts from (eval and predict do)
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "ft", "--pretrained-file", str(out / "last.pt")))
    assert code == 0 and "also holds EMA weights ('model_ema'); fine-tuning starts from the model's" in err


def test_resume_reports_every_changed_option(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, "--sched", "cosine", "--min-lr", "0.001",
                                      "--interpolation", "box", epochs=1))[0] == 0
    code, _, err = run_cli(capsys, train_argv(data, out, "--sched", "cosine", "--resume", "--workers", "1",
                                              epochs=2))
    assert code == 0 and "min_lr (0.001 -> 0.0)" in err and "interpolation (box -> bilinear)" in err
    assert "workers" not in err.split("warning: resuming with different")[1].splitlines()[0]
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stdout, err = run_cli(capsys, train_argv(data, out, "--sched", "cosine", "--min-lr", "0.001",
                                                   "--interpolation", "box", "--resume", epochs=2))
    assert code == 0 and "nothing to train" in err and "nothing trained (2 epoch(s) were done)" in stdout
    # nothing trained, nothing written: no new TensorBoard events, the same log and curves
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    code, stdout, _ = run_cli(capsys, train_argv(data, out, "--sched", "cosine", "--min-lr", "0.001",
                                                 "--interpolation", "box", "--resume", "--json", epochs=3))
    summary = json.loads(stdout)
    assert code == 0 and summary["epochs"] == 3 and summary["epochs_trained"] == 1
    # eval and predict resize as the run did: its --interpolation, not the model's default
    from torchvision.transforms import InterpolationMode

    from sanet.engine.modeling import load_for_inference
    from sanet.engine.predict import eval_transform

    loaded = load_for_inference(None, checkpoint=out / "last.pt")
    assert loaded.data_args.get("interpolation") == "box"
    assert eval_transform(loaded.model, loaded.data_args).transforms[0].interpolation == InterpolationMode.BOX


def test_json_error_is_one_json_object(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out))[0] == 0
    code, stdout, err = run_cli(capsys, train_argv(data, out, "--json"))  # the run exists
    assert code == 2 and "already holds a run" in err
    assert json.loads(stdout) == {"error": err.split("error: ", 1)[1].strip(), "command": "train"}


def test_peer_failure_under_torchrun_points_at_the_other_process(capsys, tmp_path, data, monkeypatch):
    """Rank 0 of a torchrun job whose other process died (say, on an unreadable image) fails
    in a collective; its error (and JSON) says so instead of only the backend's words."""
    import torch.distributed as dist

    import sanet.engine

    def peer_died(args):
        raise dist.DistBackendError("[gloo] Connection closed by peer [127.0.0.1]:1234")

    monkeypatch.setattr(sanet.engine, "fit", peer_died)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, stdout, err = run_cli(capsys, train_argv(data, tmp_path / "run", "--json"))
    assert code == 2 and "another process of this torchrun job probably failed first" in err
    obj = json.loads(stdout)  # the JSON names the cause's place, not the backend's words
    assert obj["error"].startswith("another process of this torchrun job failed first; its error is in the log")
    assert "Connection closed by peer" in obj["detail"] and obj["command"] == "train"
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process: the message as it is
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "run"))
    assert code == 2 and "another process" not in err

    def peer_reset(args):  # gloo's other wording (seen once in 8 runs): it was a traceback
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:30921: "
                           "Connection reset by peer")

    monkeypatch.setattr(sanet.engine, "fit", peer_reset)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, stdout, err = run_cli(capsys, train_argv(data, tmp_path / "run", "--json"))
    assert code == 2 and json.loads(stdout)["error"].startswith("another process of this torchrun job failed first")


def test_errors_for_the_user_are_one_line_and_bugs_keep_their_traceback(capsys, tmp_path, data, monkeypatch):
    import sanet
    import sanet.engine

    def fails_with(exc):
        def fit(args):
            raise exc
        return fit

    monkeypatch.setattr(sanet.engine, "fit", fails_with(sanet.SanetError("bad file x.pt")))
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "run"))
    assert code == 2 and err.strip() == "sanet train: error: bad file x.pt"
    monkeypatch.setattr(sanet.engine, "fit", fails_with(torch.OutOfMemoryError("CUDA out of memory. Tried...")))
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "run"))
    assert code == 2 and "out of memory" in err and "--batch-size" in err
    # a RuntimeError from inside torch is a bug (ours or torch's), not a user error
    monkeypatch.setattr(sanet.engine, "fit", fails_with(RuntimeError("index out of range in self")))
    with pytest.raises(RuntimeError, match="index out of range"):
        run_cli(capsys, train_argv(data, tmp_path / "run"))


def test_existing_run_is_not_overwritten_silently(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out))[0] == 0
    before = _weights(out / "last.pt")
    code, _, err = run_cli(capsys, train_argv(data, out))
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert torch.equal(_weights(out / "last.pt")["conv1.weight"], before["conv1.weight"])
    assert run_cli(capsys, train_argv(data, out, "--overwrite", "--seed", "1"))[0] == 0
    assert not torch.equal(_weights(out / "last.pt")["conv1.weight"], before["conv1.weight"])


def test_recipe_options_run(capsys, tmp_path, data):
    """Cosine + warmup, label smoothing, mixup/cutmix, EMA, accumulation, no-wd on gates,
    bf16 autocast and channels_last together for one epoch.

    32 px, not 16: at 16 px layer4's stride-2 3x3 conv sees a 1x1 input, and PyTorch's CPU bf16
    convolution (torch 2.14, oneDNN 3.12) returns garbage weight gradients for that shape."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, train_argv(
        data, out, "--img-size", "32", "--sched", "cosine", "--warmup-epochs", "1", "--smoothing", "0.1", "--mixup", "0.2",
        "--cutmix", "1.0", "--model-ema", "--model-ema-decay", "0.9", "--accum-steps", "2",
        "--no-wd-norm", "--amp", "bf16", "--channels-last", "--clip-grad", "5", "--opt", "adamw",
        "--lr", "1e-3", epochs=1))
    assert code == 0, err
    assert "best val top-1 of the EMA" in stdout and "(EMA " in stdout  # best.pt is chosen on the EMA
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["updates"] == 3  # 6 micro-batches / 2
    assert ckpt["model_ema"] is not None
    assert ckpt["scaler"] is None  # bf16 needs no loss scaling (only fp16 has a GradScaler)
    assert not torch.equal(ckpt["model_ema"]["fc.weight"], ckpt["model"]["fc.weight"])
    assert len(ckpt["optimizer"]["param_groups"]) == 2  # decay / no decay
    assert "val_top1_ema" in ckpt["history"][0]
    assert ckpt["scheduler"]["warmup_t"] == 3  # 1 epoch of updates
    # a 1-epoch run that is all warmup never trains at --lr: said, on stderr
    assert "warning: --warmup-epochs 1 >= --epochs 1: the learning rate rises for the whole run and never " \
        "reaches 0.001" in err and "warning" not in stdout


@pytest.mark.parametrize("flags, mode", [(["--compile"], None),
                                         (["--compile-mode", "reduce-overhead"], "reduce-overhead")])
def test_compile_flags_reach_torch_compile(capsys, tmp_path, data, monkeypatch, flags, mode):
    """--compile compiles with torch's default mode; --compile-mode implies --compile and
    passes the mode (compiling itself is left out here: minutes on 2 cores)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "run", *flags))
    assert code == 0, err
    assert seen == [mode]
    assert load_ckpt(tmp_path / "run" / "last.pt")["args"]["compile"] is True
    # how the run is compiled is run control: a resume that changes it does not warn
    code, stdout, err = run_cli(capsys, train_argv(data, tmp_path / "run", "--resume", "--compile-mode",
                                                   "max-autotune-no-cudagraphs", epochs=2))
    assert code == 0 and "resuming with different" not in stdout + err, stdout + err
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, train_argv(data, tmp_path / "bad", "--compile-mode", "fastest"))
    assert exc.value.code == 2 and "reduce-overhead" in capsys.readouterr().err


def test_model_ema_warmup_follows_the_model_early(capsys, tmp_path, data):
    """With decay 0.9998 the EMA of a 6-update run stays at the initial weights; with
    --model-ema-warmup its decay ramps up from 0, so it follows the trained weights."""
    dist = {}
    for flags in ((), ("--model-ema-warmup",)):
        out = tmp_path / f"run{len(flags)}"
        code, _, err = run_cli(capsys, train_argv(data, out, "--model-ema", *flags))
        assert code == 0, err
        ckpt = load_ckpt(out / "last.pt")
        ema, model = ckpt["model_ema"]["fc.weight"], ckpt["model"]["fc.weight"]
        dist[bool(flags)] = ((ema - model).norm() / model.norm()).item()
        assert ckpt["args"]["model_ema_warmup"] is bool(flags)
    assert dist[True] < 0.5 * dist[False], dist


def test_step_schedule_divides_lr_by_10(capsys, tmp_path, data):
    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, train_argv(data, out, "--decay-epochs", "1", "--lr", "0.01", epochs=2))
    assert code == 0
    lrs = [row["lr"] for row in load_ckpt(out / "last.pt")["history"]]
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.001)


def test_pretrained_file_fine_tunes_with_new_classifier(capsys, tmp_path, data):
    src = tmp_path / "src"
    assert run_cli(capsys, train_argv(data, src))[0] == 0
    two = make_imagefolder(tmp_path / "two", classes=("x", "y"))
    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, train_argv(two, out, "--pretrained-file", str(src / "last.pt"),
                                              "--lr", "1e-9", "--weight-decay", "0"))
    assert code == 0, err
    ft, base = _weights(out / "last.pt"), _weights(src / "last.pt")
    assert ft["fc.weight"].shape == (2, 256)
    assert torch.allclose(ft["conv1.weight"], base["conv1.weight"], atol=1e-6)
    assert "EMA" not in err
    # the original command + --resume, with the file it started from gone: last.pt is what loads
    moved = tmp_path / "src-moved.pt"
    (src / "last.pt").rename(moved)
    code, _, err = run_cli(capsys, train_argv(two, out, "--pretrained-file", str(src / "last.pt"),
                                              "--lr", "1e-9", "--weight-decay", "0", "--resume", epochs=2))
    assert code == 0, err  # (it was "checkpoint not found", the file read for nothing)
    moved.rename(src / "last.pt")
    # a file of another architecture is refused with the mismatching keys
    bad = dict(base)
    bad.pop("layer4.0.sa.cweight")
    torch.save(bad, tmp_path / "bad.pt")
    code, _, err = run_cli(capsys, train_argv(two, tmp_path / "ft2", "--pretrained-file", str(tmp_path / "bad.pt")))
    assert code == 2 and "layer4.0.sa.cweight" in err and "missing" in err
    assert f"--pretrained-file {tmp_path / 'bad.pt'}" in err
    # the same for a plain timm model (no SA checkpoint filter): one line naming the file, or
    # the model the file names
    for weights, words in ((tmp_path / "bad.pt", f"--pretrained-file {tmp_path / 'bad.pt'}: checkpoint does "
                            "not match resnet10t"), (src / "last.pt", "says it holds sa_resnet_test weights")):
        argv = train_argv(two, tmp_path / "ft3", "--pretrained-file", str(weights))
        argv[argv.index("sa_resnet_test")] = "resnet10t"
        code, _, err = run_cli(capsys, argv)
        assert code == 2 and words in err, err
        assert len(err.strip().splitlines()) == 1, err


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss that ruins the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("poison, call, message", [
    # stopped before that step is applied: 6 + 1 updates done, so it would have been the 8th
    ("loss", 6 + 2, "loss is nan at epoch 2, step 2/6 (optimizer update 8)"),
    ("grad", 6 + 6, "weights became NaN/inf during epoch 2"),  # last step of epoch 2: caught before saving
])
def test_non_finite_stops_naming_where_and_keeps_last_checkpoint(capsys, tmp_path, data, monkeypatch,
                                                                  poison, call, message):
    import sanet.engine.trainer as trainer

    real = trainer.build_train_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)

        def fn(logits, target):
            calls["n"] += 1
            if calls["n"] == call and poison == "grad":
                logits = _NanGrad.apply(logits)
            value = loss(logits, target)
            return value * float("nan") if calls["n"] == call and poison == "loss" else value
        return fn

    monkeypatch.setattr(trainer, "build_train_loss", lambda *a, **k: _Wrap(poisoned(*a, **k)))
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, train_argv(data, out, epochs=3))
    assert code == 2
    assert message in err and "The last good checkpoint" in err and "(after epoch 1)" in err
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["epoch"] == 1 and load_ckpt(out / "best.pt")["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, logits, target):
        return self.fn(logits, target)


def test_unreadable_image_is_named_or_skipped(capsys, tmp_path):
    data = make_imagefolder(tmp_path / "data")
    bad = data / "train" / "b" / "broken.png"
    bad.write_bytes(b"not an image")
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r1", batch=5))  # 25 images: all loaded
    assert code == 2 and str(bad) in err and "--skip-bad-images" in err
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r2", "--skip-bad-images", "--batch-size", "25"))
    assert code == 0, err
    assert load_ckpt(tmp_path / "r2" / "last.pt")["history"][0]["train_skipped"] == 1


def test_unreadable_image_is_named_with_workers(capsys, tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=2)
    bad = data / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r", "--workers", "1", batch=7))
    assert code == 2 and f"cannot read image {bad}" in err and "Traceback" not in err


@pytest.mark.parametrize("case, message", [
    ("missing", "--data folder not found"),
    ("no_val", "validation folder not found"),
    ("empty", "is empty or holds no images"),
    ("mismatch", "only in train: ['c']"),
    ("big_batch", "exceeds the 24 training images"),
    ("bad_value", "--epochs must be at least 1"),
    ("batch_one", "--batch-size must be at least 2"),
    ("bad_seed", "--seed must be in [0, 2**32), got -1"),
    ("odd_mixup", "--batch-size must be even"),
    ("no_resume", "last.pt not found"),
    ("zero_base", "--lr-base-size must be at least 1, got 0"),
    ("zero_decay", "--decay-epochs must be positive, got 0.0"),
    ("ratio", "--ratio must be 0 < MIN <= MAX"),
    ("mixup_prob", "--mixup-prob must be a probability in [0, 1], got 2.0"),
    ("warmup", "--warmup-epochs must be 0 or more, got -1.0"),
    ("accum", "--accum-steps 100 exceeds the 6 batches of an epoch"),
    ("tiny_crop", "--crop-pct must be at least 0.25"),  # 1e-4 filled the memory until killed
    ("huge_img", "--img-size must be in [8, 4096] pixels, got 5000"),
    ("opt_needs_cuda", "--opt 'bnbadam' can't be used here ("),  # was a traceback from timm
    ("unknown_opt", "unknown --opt 'adamx'"),
])
def test_clear_errors(capsys, tmp_path, data, case, message):
    root = tmp_path / "d"
    argv = {
        "missing": lambda: train_argv(tmp_path / "nope", tmp_path / "r"),
        "no_val": lambda: train_argv(make_imagefolder(root, splits={"train": 2}), tmp_path / "r"),
        "empty": lambda: (make_imagefolder(root), [p.unlink() for p in (root / "val").rglob("*.png")],
                          train_argv(root, tmp_path / "r"))[-1],
        "mismatch": lambda: (make_imagefolder(root), [p.unlink() for p in (root / "val" / "c").iterdir()],
                             (root / "val" / "c").rmdir(), train_argv(root, tmp_path / "r"))[-1],
        "big_batch": lambda: train_argv(data, tmp_path / "r", batch=25),
        "bad_value": lambda: train_argv(data, tmp_path / "r", epochs=0),
        "batch_one": lambda: train_argv(data, tmp_path / "r", batch=1),
        "bad_seed": lambda: train_argv(data, tmp_path / "r", "--seed", "-1"),
        "odd_mixup": lambda: train_argv(data, tmp_path / "r", "--mixup", "0.2", batch=3),
        "no_resume": lambda: train_argv(data, tmp_path / "r", "--resume"),
        "zero_base": lambda: train_argv(data, tmp_path / "r", "--lr-base-size", "0"),
        "zero_decay": lambda: train_argv(data, tmp_path / "r", "--decay-epochs", "0"),
        "ratio": lambda: train_argv(data, tmp_path / "r", "--ratio", "2", "1"),
        "mixup_prob": lambda: train_argv(data, tmp_path / "r", "--mixup-prob", "2"),
        "warmup": lambda: train_argv(data, tmp_path / "r", "--warmup-epochs", "-1"),
        "accum": lambda: train_argv(data, tmp_path / "r", "--accum-steps", "100"),
        "tiny_crop": lambda: train_argv(data, tmp_path / "r", "--crop-pct", "0.0001"),
        "huge_img": lambda: train_argv(data, tmp_path / "r", "--img-size", "5000"),
        "opt_needs_cuda": lambda: train_argv(data, tmp_path / "r", "--opt", "bnbadam"),
        "unknown_opt": lambda: train_argv(data, tmp_path / "r", "--opt", "adamx"),
    }[case]()
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback


def test_resume_with_another_architecture_is_refused(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out))[0] == 0
    argv = train_argv(data, out, "--resume", epochs=2)
    argv[argv.index("sa_resnet_test")] = "sa_resnet18"
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and "checkpoint of sa_resnet_test, not sa_resnet18" in err
    # as many classes under other names: the classifier's rows would mean other classes
    other = make_imagefolder(tmp_path / "other", classes=("x", "y", "z"), per_class=2)
    code, _, err = run_cli(capsys, train_argv(other, out, "--resume", epochs=2))
    assert code == 2 and "was trained on 3 classes ['a', 'b', 'c']" in err and load_ckpt(out / "last.pt")["epoch"] == 1


def test_unknown_interpolation_is_a_usage_error(capsys, tmp_path, data):
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, train_argv(data, tmp_path / "r", "--interpolation", "foo"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "invalid choice: 'foo'" in err and "bicubic" in err


def test_sync_bn_on_cpu_is_a_clear_error(capsys, tmp_path, data):
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r", "--sync-bn", "--device", "cpu"))
    assert code == 2 and "needs CUDA" in err


def test_help_documents_the_recipe(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, ["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--resume", "--amp", "--channels-last", "--compile", "--model-ema", "--accum-steps",
                 "--no-wd-norm", "--pretrained-file", "--deterministic", "--mixup", "--smoothing"):
        assert flag in out
    assert "torchrun" in out
