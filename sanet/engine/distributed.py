"""Process-group setup for ``torchrun`` (DDP) and the single-process case.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (or
a rendezvous endpoint for multi-node runs); we read them through ``init_process_group``'s
``env://`` default. NCCL on GPUs, gloo on CPU.

Not timm's ``init_distributed_device``/``reduce_tensor``: those work on timm ``train.py``'s
argument namespace (they read and set its fields) and average where we need sums (top-1 over
shards of unequal size); what is left is a few calls of ``torch.distributed`` itself.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..errors import SanetError

__all__ = ["DistContext", "init_distributed", "cleanup_distributed", "all_reduce_sum", "broadcast_buffers",
           "check_same_images", "resolve_device"]

#: ``--device`` choice -> how to decide whether to use CUDA.
_DEVICE_CHOICES = {
    "auto": lambda: torch.cuda.is_available(),
    "cuda": lambda: True,
    "cpu": lambda: False,
}


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``--device`` (auto/cpu/cuda) -> a torch device (``cuda:LOCAL_RANK`` on GPU)."""
    if choice not in _DEVICE_CHOICES:
        raise ValueError(f"--device must be one of {', '.join(_DEVICE_CHOICES)}, got {choice!r}")
    if not _DEVICE_CHOICES[choice]():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SanetError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if local_rank >= count:  # torch.cuda.set_device would fail with "invalid device ordinal"
        raise SanetError(f"this process has LOCAL_RANK {local_rank} but sees {count} GPU(s) (cuda:0 to "
                         f"cuda:{count - 1}): start at most {count} process(es) per machine "
                         "(torchrun --nproc-per-node), or make every GPU visible to each of them "
                         "(CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank)


def init_distributed(device_choice: str = "auto") -> DistContext:
    """Join the ``torchrun`` job if there is one, else return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: Optional[DistContext] = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (in place); a no-op for a single process."""
    if dist.is_available() and dist.is_initialized() and (ctx is None or ctx.distributed):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP does this at the start of each training forward, but every rank then updates its
    running statistics from its own images; before validating, all ranks must hold the
    model that rank 0 checkpoints.
    """
    if not ctx.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def check_same_images(ctx: DistContext, datasets: Dict[str, Any]) -> None:
    """Every process of a job must list the same images (``dataset.samples``, paths relative to
    ``dataset.root``), or training hangs (the processes have different numbers of batches and
    wait for each other in a collective) and evaluation counts some images twice and others
    not at all. Copies that differ between machines, or a folder one process cannot read, do
    that; this compares a digest of each listing over all processes and says so."""
    if not ctx.distributed:
        return
    mine = _listing_rows(datasets).to(ctx.device)
    gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    for i, what in enumerate(datasets):
        if len({int(g[i, 1]) for g in gathered}) > 1:
            counts = ", ".join(f"rank {r}: {int(g[i, 0])}" for r, g in enumerate(gathered))
            raise SanetError(f"the processes of this job list different {what} images ({counts} images, or the "
                             "same number of other files): every process must see the same files (a shared "
                             "file system, or identical copies on every machine; a folder that one process "
                             "cannot read is one way they differ)")


def _listing_rows(datasets: Dict[str, Any]) -> torch.Tensor:
    """Per dataset: (image count, a 56-bit digest of its (relative path, class) listing)."""
    rows = []
    for dataset in datasets.values():
        h = hashlib.sha256()
        for path, target in dataset.samples:
            h.update(f"{os.path.relpath(path, dataset.root)}\t{target}\n".encode("utf-8", "surrogateescape"))
        rows.append([len(dataset.samples), int.from_bytes(h.digest()[:7], "big")])  # 56 bits: an int64
    return torch.tensor(rows, dtype=torch.int64)
