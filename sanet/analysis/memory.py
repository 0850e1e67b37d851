"""Memory accounting that works on any device: bytes saved for backward, peak live bytes.

* :func:`saved_tensor_bytes` counts every tensor autograd keeps for backward (through
  ``torch.autograd.graph.saved_tensors_hooks``), once per storage, so a tensor kept by two
  ops (a ReLU output that the next conv also keeps) counts once, as it does in memory. The
  total includes the tensors that exist anyway (a model's weights, which convolutions save);
  pass them as ``exclude`` for the activations alone.
* :class:`PeakMemoryTracker` follows the storages that ops return under it (a
  ``TorchDispatchMode``; a weakref finalizer subtracts one when it is freed) and reports the
  peak of their sum. It sees the outputs of PyTorch ops and custom ops alike, on CPU as on
  CUDA, but not what an op allocates and frees inside itself: a kernel's workspace, or the
  fused SA op's contiguous copies of a ``channels_last`` input and output (measured with the
  profiler's allocation events, the fused layer's forward+backward on a channels_last
  8x256x28x28 input peaks one input's size, 6.1 MiB, above the 18.4 MiB counted here;
  contiguous input: the same 12.3 MiB both ways). It is a lower bound, exact where ops
  allocate nothing but their outputs.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["saved_tensor_bytes", "PeakMemoryTracker"]


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


def saved_tensor_bytes(fn: Callable[[], torch.Tensor],
                       exclude: Iterable[torch.Tensor] = ()) -> Dict[str, int]:
    """Run ``fn`` (a forward pass) and count what autograd saved; frees the graph after.

    Returns ``bytes`` (every saved storage), ``activation_bytes`` (those not shared with a
    tensor of ``exclude``, e.g. ``[*model.parameters(), *model.buffers()]``: what the forward
    pass itself added), ``tensors`` (saved tensors) and ``storages`` (distinct storages).
    """
    # A parameter's storage, whether saved as itself or as a view (a linear layer's w.t()).
    excluded = {_storage_key(t)[0] for t in exclude}
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
    return {"bytes": sum(storages.values()),
            "activation_bytes": sum(n for k, n in storages.items() if k not in excluded),
            "tensors": count, "storages": len(storages)}


class PeakMemoryTracker(TorchDispatchMode):
    """``with PeakMemoryTracker() as m: ...`` then ``m.peak``: the largest sum of the live
    storages that ops returned under the tracker (in-op temporaries are not seen: see the
    module's docstring)."""

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
