"""Seeding and training checkpoints (``OUT/last.pt``, ``OUT/best.pt``).

A checkpoint is written at every epoch boundary, atomically (``atomic_torch_save``: a kill
mid-write leaves the previous file). It holds only tensors, plain containers, strings and
numbers, so it loads with ``torch.load(weights_only=True)``:

``model`` (state_dict), ``model_ema`` (state_dict or None), ``optimizer``, ``scheduler``,
``scaler`` (or None), ``epoch`` (epochs completed), ``updates``, ``best_top1``, ``best_epoch``,
``args`` (the resolved arguments as plain data), ``class_names``, ``history`` (one dict per
epoch, what the CSV log holds), ``arch``, ``sanet_version``, ``torch_version``.

``scheduler`` is a record: a resume rebuilds the schedule from the arguments and sets it to
the epoch (it stays right when --epochs or the batch size change). No generator states are
kept either: every epoch reseeds them from (seed, epoch, rank) (:func:`seed_epoch`).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import SanetError

__all__ = ["seed_everything", "seed_epoch", "save_training_checkpoint", "restore_best_checkpoint",
           "load_resume_checkpoint", "optional_state"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed every generator from (seed, epoch, rank): augmentation, mixup and dropout of an
    epoch then do not depend on how the run got there (fresh or resumed)."""
    seed_everything(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def save_training_checkpoint(out: Path, state: Dict[str, Any], is_best: bool) -> None:
    """Write ``last.pt``, then ``best.pt`` when this epoch is the best so far, atomically.

    ``last.pt`` is the commit point: a resume redoes every epoch after it. ``best.pt`` goes
    second so that it never holds an epoch a resume would redo (on a nondeterministic run the
    redone epoch can score differently, and ``best.pt`` would belong to no run). A kill between
    the two writes leaves ``best.pt`` one best behind while ``last.pt`` holds that best epoch;
    ``restore_best_checkpoint`` copies it over when the run resumes."""
    from sanet.checkpoint import atomic_torch_save

    atomic_torch_save(state, out / "last.pt")
    if is_best:
        atomic_torch_save(state, out / "best.pt")


def restore_best_checkpoint(out: Path, ckpt: Dict[str, Any]) -> bool:
    """On resume: when ``last.pt`` (``ckpt``) is itself the best epoch but ``best.pt`` is
    missing, damaged or older (a kill between the two writes), copy ``last.pt`` to ``best.pt``.
    Returns whether it did."""
    import shutil

    from sanet.checkpoint import atomic_write, load_checkpoint_file

    if ckpt.get("best_epoch") != ckpt.get("epoch"):
        return False
    best = out / "best.pt"
    if best.is_file():
        try:
            if load_checkpoint_file(best).get("epoch") == ckpt["epoch"]:
                return False
        except (RuntimeError, AttributeError):  # damaged or not ours: replaced below
            pass
    atomic_write(best, lambda tmp: shutil.copyfile(out / "last.pt", tmp))
    return True


def load_resume_checkpoint(out: Path, model_name: str, class_names: list) -> Dict[str, Any]:
    """``OUT/last.pt``, checked against this run's architecture and classes."""
    from sanet.checkpoint import load_checkpoint_file

    from .modeling import check_checkpoint_model

    path = out / "last.pt"
    if not path.is_file():
        # stopped after logging its 1st epoch, before saving it
        if (out / "log.csv").is_file() and not (out / "best.pt").exists():
            raise FileNotFoundError(f"--resume: {path} not found: the run in {out} stopped before its first "
                                    "checkpoint (it holds log.csv only), so there is nothing to continue; "
                                    "start afresh with --overwrite instead of --resume")
        if (out / "best.pt").exists():  # last.pt removed by hand: a plain start refuses this folder too
            raise FileNotFoundError(f"--resume: {path} not found, but {out} holds best.pt: a resume continues "
                                    "from last.pt only; start afresh with --overwrite (it replaces best.pt), "
                                    "or fine-tune from it with --pretrained-file and another --output")
        raise FileNotFoundError(f"--resume: {path} not found (no completed epoch to continue from; "
                                "start without --resume)")
    try:
        ckpt = load_checkpoint_file(path)
    except SanetError as exc:  # damaged after it was written (sanet writes it atomically)
        best = out / "best.pt"
        raise SanetError(f"--resume: {exc}. It can't be continued"
                         + (f"; {best} may still load: fine-tune from it in a new --output with --pretrained-file "
                            f"{best}" if best.is_file() else "") + ", or start afresh with --overwrite") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise ValueError(f"--resume: {path} is not a sanet train checkpoint")
    check_checkpoint_model(ckpt, model_name, str(path))
    saved = list(ckpt.get("class_names") or [])
    if saved != list(class_names):
        # name what differs: the first five of each often match (a renamed or added class)
        only_ckpt = sorted(set(saved) - set(class_names))
        only_data = sorted(set(class_names) - set(saved))
        raise ValueError(f"--resume: {path} was trained on {len(saved)} classes {saved[:5]}"
                         f"{'...' if len(saved) > 5 else ''}, but --data has {len(class_names)}: only in the "
                         f"checkpoint: {only_ckpt[:10] or 'none'}; only in "
                         f"--data: {only_data[:10] or 'none'} (labels are class-folder indices, so the "
                         "class folders must be those of the run; a new class set is a new run: "
                         f"--pretrained-file {path} with another --output)")
    return ckpt


def optional_state(obj: Optional[Any]) -> Optional[Dict[str, Any]]:
    return None if obj is None else obj.state_dict()
