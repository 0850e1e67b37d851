"""Top-1/top-5/loss over a loader, summed over DDP ranks."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import UnreadableImageError, clean_worker_error
from .distributed import DistContext, all_reduce_sum

__all__ = ["evaluate", "autocast_for", "slow_amp_note"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``--amp bf16|fp16``, or a no-op context."""
    if not amp or amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


def slow_amp_note(device: torch.device, amp: Optional[str]) -> Optional[str]:
    """A warning for ``--amp fp16`` on a CPU, else None. It runs, but PyTorch's CPU float16
    kernels are slow: sa_resnet50 took 10-11x the fp32 training step and 21-22x its inference
    (``benchmarks/amp_cpu.py``, docs/benchmarks.md), where bf16 took 0.54x and 0.61x."""
    if amp != "fp16" or device.type != "cpu":
        return None
    return ("--amp fp16 on the CPU is slow (PyTorch's CPU float16 kernels: sa_resnet50 measured about 10x the "
            "fp32 training step and over 20x its inference, see docs/benchmarks.md); --amp bf16 is the CPU's "
            "mixed precision")


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: DistContext, *, amp: Optional[str] = None,
             channels_last: bool = False, target_map: Optional[torch.Tensor] = None,
             progress: bool = False, desc: str = "eval") -> Dict[str, float]:
    """``top1``/``top5`` (percent), mean ``loss``, ``images``, ``skipped``, ``images_per_s``
    (after the first batch, which pays for lazy kernel loading and allocation), and
    ``nonfinite``: images whose outputs hold a NaN or inf (their ranks mean nothing).

    Sums are reduced over ranks, so each image counts once (the eval loader shards without
    padding). ``target_map`` maps dataset class indices to model outputs.
    """
    model.eval()
    # correct1, correct5, loss, n, skipped, nonfinite
    sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)
    start = time.perf_counter()
    warm = None  # (time, images) after the first batch: throughput excludes one-time setup
    # disable=None: tqdm's "only on a terminal" (a bar in a log file is a line per redraw)
    bar = tqdm(loader, desc=desc, disable=None if progress and ctx.is_main else True, leave=False,
               dynamic_ncols=True)
    try:
        for images, targets, skipped in bar:
            sums[4] += skipped
            if targets.numel() == 0:
                continue
            images = images.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
            if target_map is not None:
                targets = target_map.to(ctx.device)[targets]
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_for(ctx.device, amp):
                logits = model(images)
            logits = logits.float()
            n = targets.numel()
            # Whole counts of correct images (timm's accuracy() gives fp32 percentages, whose
            # rounding made equal top-1 epochs compare unequal and a tie replace best.pt).
            # Accumulated on the device: no host sync per batch (it would stall a GPU pipeline).
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
            sums[0] += hits[:, :1].sum()
            sums[1] += hits.sum()
            sums[2] += F.cross_entropy(logits, targets, reduction="sum").double()
            sums[3] += n
            sums[5] += (~logits.isfinite()).any(dim=1).sum()
            if warm is None:
                warm = (time.perf_counter(), sums[3].item())
    except UnreadableImageError as exc:  # re-raised from a worker: keep only the message
        raise UnreadableImageError(clean_worker_error(exc)) from None
    local_images = sums[3].item()
    all_reduce_sum(sums, ctx)
    end = time.perf_counter()
    seconds = end - start
    if warm is not None and local_images > warm[1] and end > warm[0]:
        per_s = (local_images - warm[1]) / (end - warm[0]) * (sums[3].item() / local_images)
    else:
        per_s = sums[3].item() / seconds if seconds > 0 else 0.0
    n = max(sums[3].item(), 1.0)
    return {
        "top1": 100.0 * sums[0].item() / n,
        "top5": 100.0 * sums[1].item() / n,
        "loss": sums[2].item() / n,
        "images": int(sums[3].item()),
        "skipped": int(sums[4].item()),
        "nonfinite": int(sums[5].item()),
        "seconds": seconds,
        "images_per_s": per_s,
    }
