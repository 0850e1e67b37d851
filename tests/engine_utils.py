"""Helpers shared by the train/eval/predict/DDP tests: tiny ImageFolders, CLI runs, checkpoints."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_imagefolder(root: Path, classes: Sequence[str] = ("a", "b", "c"), per_class: int = 8,
                     size: int = 16, seed: int = 0, splits: Dict[str, int] = None) -> Path:
    """``root/{train,val}/<class>/<i>.png``: each class a noisy image tinted its own colour, so a
    tiny model learns it in a few steps."""
    rng = np.random.default_rng(seed)
    splits = splits or {"train": per_class, "val": max(2, per_class // 2)}
    for split, count in splits.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 120, size=(size, size, 3))
                img[..., k % 3] += 120
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def train_argv(data: Path, out: Path, *extra: str, epochs: int = 1, batch: int = 4) -> List[str]:
    """A small, fast ``sanet train`` command line."""
    return ["train", "--model", "sa_resnet_test", "--data", str(data), "--output", str(out),
            "--img-size", "16", "--batch-size", str(batch), "--epochs", str(epochs), "--workers", "0",
            "--no-progress", *extra]


def parse_train_args(*argv: str, model: str = "sa_resnet_test"):
    """``sanet train``'s parsed options for ``argv``, with placeholder data and output folders."""
    from sanet.cli import build_parser

    return build_parser().parse_args(["train", "--model", model, "--data", "d", "--output", "o", *argv])


def run_cli(capsys, argv: List[str]) -> Tuple[int, str, str]:
    """``sanet ARGV`` in this process: (exit code, stdout, stderr)."""
    from sanet.cli import main

    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli_args(capsys, *argv: str) -> Tuple[int, str, str]:
    """``sanet ARGV`` in this process, a usage error (argparse's SystemExit) included:
    (exit code, stdout, stderr)."""
    from sanet.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def subprocess_env(threads: int = 1) -> dict:
    """Environment for ``python -m sanet`` subprocesses: one thread each (2 shared cores)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable


def straight_and_resumed_runs(capsys, monkeypatch, data: Path, root: Path, *flags: str, epochs: int = 2,
                              before_resume=lambda: None) -> Tuple[Path, Path]:
    """The same run twice: straight through (``root/straight``), and stopped by Ctrl-C right
    after its first checkpoint, then ``--resume``d (``root/split``); ``before_resume`` runs
    between the two halves."""
    import sanet.engine.trainer as trainer

    straight, split = root / "straight", root / "split"
    assert run_cli(capsys, train_argv(data, straight, *flags, epochs=epochs))[0] == 0
    real_save = trainer.save_training_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer, "save_training_checkpoint", save_then_die)
        assert run_cli(capsys, train_argv(data, split, *flags, epochs=epochs))[0] == 130
    before_resume()
    assert run_cli(capsys, train_argv(data, split, *flags, "--resume", epochs=epochs))[0] == 0
    return straight, split
