"""One training epoch: AMP, gradient accumulation, mixup, EMA, non-finite loss guard."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..errors import SanetError
from .data import UnreadableImageError, clean_worker_error
from .distributed import DistContext, all_reduce_sum
from .evaluate import autocast_for

__all__ = ["NonFiniteLossError", "TrainState", "train_one_epoch"]


class NonFiniteLossError(SanetError):
    """The loss became NaN or infinite; training stopped before using it."""


@dataclass
class TrainState:
    """What one epoch needs. ``model`` is what we call (maybe DDP and/or compiled), ``raw`` the
    plain module (for EMA), ``ddp`` the DDP wrapper or None."""

    model: nn.Module
    raw: nn.Module
    ddp: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler
    mixup: Any = None
    ema: Any = None
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    amp: Optional[str] = None
    channels_last: bool = False
    skip_bad_images: bool = False
    updates: int = 0


def _check_finite(loss: torch.Tensor, ctx: DistContext, epoch: int, step: int, steps: int,
                  updates: int) -> float:
    """The rank-averaged loss; raises on NaN/inf on every rank alike, before backward."""
    value = loss.detach().float().reshape(1).clone()
    all_reduce_sum(value, ctx)
    value = value.item() / ctx.world_size
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value} at epoch {epoch + 1}, step {step + 1}/{steps} (optimizer update "
            f"{updates + 1}); training stopped before applying it")
    return value


def _batch(images: torch.Tensor, targets: torch.Tensor, state: TrainState, ctx: DistContext):
    images = images.to(ctx.device, non_blocking=True)
    targets = targets.to(ctx.device, non_blocking=True)
    if state.mixup is not None:
        if len(images) % 2:  # timm's Mixup pairs samples; only happens after skipped images
            images, targets = images[:-1], targets[:-1]
        images, targets = state.mixup(images, targets)
    if state.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def train_one_epoch(state: TrainState, loader, ctx: DistContext, epoch: int, epochs: int,
                    progress: bool = True) -> Dict[str, float]:
    """Train over ``loader`` once; returns ``train_loss``, ``lr``, image counts and speed."""
    state.model.train()
    steps = len(loader)
    loss_sum, images_seen, skipped_total, counted, used = 0.0, 0, 0, 0, 0
    start = time.perf_counter()
    # disable=None: tqdm's "only on a terminal" (a bar in a log file is a line per redraw)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=None if progress and ctx.is_main else True,
               dynamic_ncols=True, unit="step")
    state.optimizer.zero_grad(set_to_none=True)
    lr_start = float(state.optimizer.param_groups[0]["lr"])  # what this epoch started with
    # The schedule's clock: optimizer-step slots since the start of training, from the epoch
    # (as timm's train script counts), so a resume with another batch size stays in place.
    schedule_start = epoch * math.ceil(steps / state.accum_steps)
    it = iter(loader)
    for step in range(steps):
        try:
            images, targets, skipped = next(it)
        except UnreadableImageError as exc:  # re-raised from a worker: keep only the message
            raise UnreadableImageError(clean_worker_error(exc)) from None
        skipped_total += skipped
        group_start = step - step % state.accum_steps
        group_size = min(state.accum_steps, steps - group_start)
        last_in_group = step == group_start + group_size - 1
        if step == group_start:
            used = 0
        ran = _usable(len(targets), state, ctx)
        if ran:
            loss_value, n_images = _forward_backward(state, images, targets, ctx, (epoch, step, steps),
                                                     group_size, last_in_group)
            used += 1
            loss_sum += loss_value
            counted += 1
            images_seen += n_images
        if last_in_group and used:
            if used < group_size:  # micro-batches of unreadable images were skipped
                _complete_group_gradients(state, ctx, used, group_size, synced=ran)
            _optimizer_step(state, schedule_start + step // state.accum_steps + 1)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss_sum / max(counted, 1):.4f}", lr=f"{state.optimizer.param_groups[0]['lr']:.3g}",
                        img_s=f"{images_seen * ctx.world_size / max(elapsed, 1e-9):.0f}", refresh=False)
        bar.update(1)
    bar.close()
    counts = torch.tensor([images_seen, skipped_total], dtype=torch.float64, device=ctx.device)
    all_reduce_sum(counts, ctx)
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss_sum / max(counted, 1),
        "lr": lr_start,
        "train_images": int(counts[0].item()),
        "train_skipped": int(counts[1].item()),
        "train_images_per_s": counts[0].item() / seconds if seconds > 0 else 0.0,
        "train_seconds": seconds,
    }


def _usable(readable: int, state: TrainState, ctx: DistContext) -> bool:
    """Whether to train on a micro-batch: BatchNorm and mixup need 2 images. Only
    ``--skip-bad-images`` leaves fewer, and then under DDP every rank skips together (they
    meet in backward's gradient sync): one small all-reduce, only with that flag."""
    if not (ctx.distributed and state.skip_bad_images):
        return readable >= 2
    short = torch.tensor([float(readable < 2)], device=ctx.device)
    return all_reduce_sum(short, ctx).item() == 0


def _complete_group_gradients(state: TrainState, ctx: DistContext, used: int, group_size: int,
                              synced: bool) -> None:
    """A group with skipped micro-batches: scale the gradients to the mean over the ones used
    (each backward divided by the full group size), and under DDP average them across ranks
    when the group's last micro-batch, whose backward would have, did not run."""
    grads = [p.grad for p in state.raw.parameters() if p.grad is not None]
    if ctx.distributed and not synced:
        for g in grads:
            all_reduce_sum(g, ctx)
        torch._foreach_div_(grads, ctx.world_size)
    torch._foreach_mul_(grads, group_size / used)


def _forward_backward(state: TrainState, images, targets, ctx: DistContext, where, group_size: int,
                      last_in_group: bool) -> Tuple[float, int]:
    """Forward + backward of one micro-batch; DDP syncs gradients only on the group's last.
    Returns the loss and the number of images trained on."""
    images, targets = _batch(images, targets, state, ctx)
    sync = state.ddp.no_sync() if state.ddp is not None and not last_in_group else nullcontext()
    with sync:
        with autocast_for(ctx.device, state.amp):
            loss = state.loss_fn(state.model(images), targets)
        loss_value = _check_finite(loss, ctx, *where, state.updates)
        state.scaler.scale(loss / group_size).backward()
    return loss_value, len(images)


def _optimizer_step(state: TrainState, schedule_position: int) -> None:
    if state.clip_grad:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.raw.parameters(), state.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.updates += 1
    if state.scheduler is not None:
        state.scheduler.step_update(num_updates=schedule_position)
    if state.ema is not None:
        state.ema.update(state.raw, step=state.updates)
