"""``SanetError``: the base of the errors whose message is meant for the user.

The ``sanet`` command prints such an error's message alone (exit status 2); any other
exception is a bug or an environment failure and keeps its traceback. It derives from
``RuntimeError`` so that code catching ``RuntimeError`` keeps working.
"""
from __future__ import annotations

__all__ = ["SanetError", "is_out_of_memory"]


class SanetError(RuntimeError):
    """A failure the user can act on (bad file, missing kernel, wrong options); the message
    says what was wrong and what would work."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch running out of memory (CUDA or CPU): the user can act on it
    (a smaller batch), and no other diagnosis should replace it."""
    import torch

    # CUDA raises torch.cuda.OutOfMemoryError (aliased torch.OutOfMemoryError from torch 2.5);
    # the CPU allocator a plain RuntimeError; Python and NumPy (image decoding) MemoryError
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)
