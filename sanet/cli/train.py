"""``sanet train --model M --data DIR --output OUT``: the authors' ImageNet recipe by default."""
from __future__ import annotations

import argparse
import contextlib
import sys

from .common import add_json_flag, check_model_name, print_json
from .pipes import pipe_safe_console

_EPILOG = """\
defaults reproduce the authors' recipe: SGD momentum 0.9, lr 0.1 per 256 images scaled to the
global batch, x0.1 every 30 epochs, 90 epochs, weight decay 1e-4, RandomResizedCrop + flip,
eval resize 256 / crop 224.

examples:
  sanet train --model sa_resnet50 --data /imagenet --output runs/sa50 --amp bf16 --channels-last
  torchrun --nproc-per-node 8 -m sanet train --model sa_resnet50 --data /imagenet \\
      --output runs/sa50 --batch-size 32          # 8 x 32 = 256 images per step, lr 0.1
  sanet train ... --resume                        # continue from OUTPUT/last.pt

see docs/training.md for multi-node commands and fine-tuning.
"""


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    from sanet.engine.config import add_train_args

    p = sub.add_parser(
        name, help="train a model on an ImageFolder dataset (also under torchrun)",
        description="Train on DATA/train, validate on DATA/val every epoch. Writes OUTPUT/last.pt "
                    "and OUTPUT/best.pt (atomically, loadable with weights_only=True), log.csv, "
                    "TensorBoard events in tb/ and curves.png. Run under `torchrun --nproc-per-node N "
                    "-m sanet train ...` for DDP (NCCL on GPUs, gloo on CPU).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    # A closed console (`sanet train ... | head`) does not stop the run: log.csv keeps it.
    with pipe_safe_console():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from sanet.engine import fit

    check_model_name(args.model)
    # With --json, stdout carries the one JSON object; the epoch lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = fit(args)  # (Ctrl-C: sanet.cli.main says what it left behind)
    if summary["world_size"] > 1 and not _is_rank0():
        return 0
    if args.json:
        print_json(summary)
        return 0
    ema = summary["best_of"] == "ema"
    last = f"last {summary['last_top1']:.2f}%"
    if ema and summary["last_top1_ema"] is not None:
        last += f" (EMA {summary['last_top1_ema']:.2f}%)"
    trained, epochs = summary["epochs_trained"], summary["epochs"]
    done = (f"nothing trained ({epochs} epoch(s) were done)" if trained == 0 else
            f"done: {trained} epoch(s) in {summary['seconds']:.0f} s"
            + (f" ({epochs} in all)" if trained != epochs else ""))
    print(f"{done}; best val top-1 "
          f"{'of the EMA ' if ema else ''}{summary['best_top1']:.2f}% (epoch {summary['best_epoch']}), {last}")
    print(f"checkpoints: {summary['last_checkpoint']}, {summary['best_checkpoint']}; "
          f"curves: {summary['curves']}")
    return 0


def _is_rank0() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
