"""DDP: ``torchrun --nproc-per-node 2 -m sanet train`` (gloo over loopback) takes the same
optimizer step as one process on the same global batch.

Why GroupNorm here: with BatchNorm each rank normalises with the statistics of its own half
batch, so DDP and a single process on the full batch differ by design; SyncBatchNorm
(``--sync-bn``) removes that difference but PyTorch implements it for GPUs only. Swapping
the norm layer (``--model-kwargs norm_layer=groupnorm1``; SA itself uses per-sample
statistics) keeps everything else, sharding, gradient all-reduce, lr scaling, metric
reduction, exactly what a user's run does.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from engine_utils import PYTHON, last_json, load_ckpt, make_imagefolder, run_cli, subprocess_env, train_argv

# no randomness in the step: the whole (square) image is the crop, no flip
_NO_AUG = ("--scale", "1", "1", "--ratio", "1", "1", "--hflip", "0", "--lr", "0.5",
           "--model-kwargs", "norm_layer=groupnorm1", "--deterministic")


def test_two_rank_ddp_step_equals_single_process_step(tmp_path):
    import timm

    from sanet.engine.state import seed_everything

    data = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=4)  # 8 train images
    env = subprocess_env(threads=1)
    ddp = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sanet",
         *train_argv(data, tmp_path / "ddp", *_NO_AUG, "--json", batch=4)],
        env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) on cpu, global batch 8" in ddp.stderr  # --json: stdout is the summary
    assert json.loads(ddp.stdout)["world_size"] == 2
    single = subprocess.run([PYTHON, "-m", "sanet", *train_argv(data, tmp_path / "one", *_NO_AUG, batch=8)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    a, b = load_ckpt(tmp_path / "ddp" / "last.pt"), load_ckpt(tmp_path / "one" / "last.pt")
    assert a["updates"] == b["updates"] == 1
    assert a["args"]["lr_resolved"] == b["args"]["lr_resolved"] == 0.5
    seed_everything(0)  # the runs' initial weights, to check the step really moved them
    init = timm.create_model("sa_resnet_test", num_classes=2, norm_layer="groupnorm1").state_dict()
    moved = max((b["model"][k] - init[k]).abs().max().item() for k in init)
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in init)
    assert moved > 1e-2, moved
    assert diff < 1e-5 * max(1.0, moved), (diff, moved)
    # validation metrics are reduced over both ranks: every val image counted once
    ra, rb = a["history"][0], b["history"][0]
    assert ra["val_images"] == rb["val_images"] == 4
    assert abs(ra["val_loss"] - rb["val_loss"]) < 1e-4 and ra["val_top1"] == rb["val_top1"]
    assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-5


def test_ddp_with_batchnorm_and_uneven_val_shards(tmp_path, capsys):
    """The default (BatchNorm) model under DDP, with 9 val images: rank 0 evaluates 5 images
    in 3 batches, rank 1 4 in 2. Each image is counted once, nothing waits on the other rank, and
    the validation metrics are those of the checkpoint rank 0 writes. With --channels-last, as
    the docs' multi-GPU command has it."""
    data = make_imagefolder(tmp_path / "data", splits={"train": 4, "val": 3})  # 12 train, 9 val
    run = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sanet",
         *train_argv(data, tmp_path / "ddp", "--channels-last", batch=2)],
        env=subprocess_env(threads=1), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    # DDP copies every gradient whose strides differ from its parameter's (SA's (1, C, 1, 1) gates)
    assert "Grad strides do not match bucket view strides" not in run.stderr
    ckpt = load_ckpt(tmp_path / "ddp" / "last.pt")
    row = ckpt["history"][0]
    assert row["val_images"] == 9 and ckpt["updates"] == 3
    # the default lr follows the global batch (2 processes x 2 images), not one process's
    assert ckpt["args"]["global_batch"] == 4 and ckpt["args"]["lr_resolved"] == pytest.approx(0.1 * 4 / 256)
    assert int(ckpt["model"]["bn1.num_batches_tracked"]) == 3  # BatchNorm, as in a user's run
    # both ranks validated the model rank 0 saved (same BatchNorm running statistics)
    code, out, _ = run_cli(capsys, ["eval", "--checkpoint", str(tmp_path / "ddp" / "last.pt"),
                                    "--data", str(data / "val"), "--workers", "0", "--json"])
    assert code == 0
    result = last_json(out)
    assert result["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    assert result["top1"] == pytest.approx(row["val_top1"], abs=1e-3)


def test_ddp_skips_a_short_batch_on_every_rank_together(tmp_path):
    """--skip-bad-images under DDP: the step where one rank has a single readable image is
    skipped by both ranks (else the other would wait in backward's gradient sync)."""
    data = make_imagefolder(tmp_path / "data", splits={"train": 4, "val": 2})  # 12 train: 3 steps of 2 per rank
    (data / "train" / "b" / "001.png").write_bytes(b"not an image")
    run = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sanet",
         *train_argv(data, tmp_path / "ddp", "--skip-bad-images", batch=2)],
        env=subprocess_env(threads=1), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load_ckpt(tmp_path / "ddp" / "last.pt")
    assert ckpt["history"][0]["train_skipped"] == 1
    assert ckpt["updates"] == 2 and ckpt["history"][0]["train_images"] == 8  # one step skipped by both
