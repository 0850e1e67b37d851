"""Optimizer, learning-rate schedule, loss and mixup, all from timm.

Defaults are the authors' recipe (SA-NET.md section 3): SGD momentum 0.9, lr 0.1 per 256
images, x0.1 every 30 epochs, weight decay 1e-4 on every parameter.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.scheduler.scheduler import Scheduler

__all__ = ["resolve_lr", "check_schedule_lrs", "sa_gate_param_names", "build_optimizer", "build_scheduler",
           "build_mixup", "build_train_loss"]


def resolve_lr(lr: Optional[float], lr_base: float, lr_base_size: int, global_batch: int) -> float:
    """``lr`` if given, else the linear scaling rule ``lr_base * global_batch / lr_base_size``."""
    if lr is not None:
        return float(lr)
    return lr_base * global_batch / lr_base_size


def check_schedule_lrs(args, lr: float) -> None:
    """A cosine floor (``--min-lr``) or a warmup start (``--warmup-lr``) above the learning rate
    ``lr`` turns the schedule upside down: timm then raises the rate where it should lower it."""
    how = "--lr" if args.lr is not None else f"--lr-base {args.lr_base:g} scaled to the global batch"
    if args.sched == "cosine" and args.min_lr > lr:
        raise ValueError(f"--min-lr {args.min_lr:g} is above the learning rate {lr:.4g} ({how}): the cosine "
                         f"schedule would rise to {args.min_lr:g} instead of decaying; give a --min-lr below it")
    if args.warmup_epochs > 0 and args.warmup_lr > lr:
        raise ValueError(f"--warmup-lr {args.warmup_lr:g} is above the learning rate {lr:.4g} ({how}): warmup "
                         "would start high and fall to it; give a --warmup-lr below it (the default is 1e-6)")


def sa_gate_param_names(model: nn.Module) -> List[str]:
    """Full names of the SA gate parameters (``cweight, cbias, sweight, sbias``).

    They are (1, c, 1, 1) tensors, so timm's "no decay on 1-D parameters and biases" filter
    does not catch them; we name them explicitly.
    """
    from sanet.layers import ShuffleAttention

    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ShuffleAttention):
            names += [f"{mod_name}.{p}" for p in ("cweight", "cbias", "sweight", "sbias")]
    return names


def build_optimizer(model: nn.Module, opt: str, *, lr: float, weight_decay: float,
                    momentum: float, no_wd_norm: bool) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``; ``no_wd_norm`` exempts norms, biases and SA gates."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    if no_wd_norm:
        # Two groups at any weight decay, so that a resume with another value fits the saved
        # optimizer state: timm returns one group for 0, so it is asked with 1 and then set.
        params: Any = param_groups_weight_decay(model, 1.0, no_weight_decay_list=sa_gate_param_names(model))
        for group in params:
            if group["weight_decay"]:
                group["weight_decay"] = weight_decay
    else:
        params = model.parameters()  # the authors decay every parameter
    return create_optimizer_v2(params, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, sched: str, *, epochs: int, updates_per_epoch: int,
                    decay_epochs: float, decay_rate: float, warmup_epochs: float, warmup_lr: float,
                    min_lr: float) -> Scheduler:
    """timm scheduler stepped once per optimizer update (``step_update``).

    Per-update stepping gives a smooth warmup/cosine; for the step schedule it decays at
    exactly the same epoch boundaries as per-epoch stepping.
    """
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_epochs=decay_epochs, decay_rate=decay_rate,
        warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return scheduler


def build_mixup(*, mixup: float, cutmix: float, prob: float, switch_prob: float, smoothing: float,
                num_classes: int) -> Optional[Mixup]:
    """timm ``Mixup`` (applied to the batch on the device), or None when both alphas are 0."""
    if not (mixup > 0 or cutmix > 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob,
                 label_smoothing=smoothing, num_classes=num_classes)


def build_train_loss(*, mixup_active: bool, smoothing: float) -> nn.Module:
    """Soft-target CE under mixup (it smooths the targets), label smoothing CE, or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()

