"""Memory accounting that works on any device: bytes saved for backward, peak live bytes.

* :func:`saved_tensor_bytes` counts every tensor autograd keeps for backward (through
  ``torch.autograd.graph.saved_tensors_hooks``), once per storage, so a tensor kept by two
  ops (a ReLU output that the next conv also keeps) counts once, as it does in memory.
* :class:`PeakMemoryTracker` follows every storage created under it (a
  ``TorchDispatchMode``; a weakref finalizer subtracts it when freed) and reports the peak.
  It sees tensors created by PyTorch ops and custom ops alike, on CPU as on CUDA.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["saved_tensor_bytes", "PeakMemoryTracker"]


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> Dict[str, int]:
    """Run ``fn`` (a forward pass) and count what autograd saved; frees the graph after."""
    storages: Dict[tuple, int] = {}
    count = 0

    def pack(t: torch.Tensor):
        nonlocal count
        count += 1
        key, nbytes = _storage_key(t)
        storages[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return {"bytes": sum(storages.values()), "tensors": count, "storages": len(storages)}


class PeakMemoryTracker(TorchDispatchMode):
    """``with PeakMemoryTracker() as m: ...`` then ``m.peak`` (bytes above the start)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[tuple, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: tuple) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views, in-place and out= ops return (parts of) their inputs, which may predate the
        # tracker: counting those storages would charge memory that was never allocated.
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key, nbytes = _storage_key(t)
                if key not in self.live and nbytes:
                    self.live[key] = nbytes
                    self.current += nbytes
                    weakref.finalize(t.untyped_storage(), self._free, key)
        self.peak = max(self.peak, self.current)
        return out
