"""``SanetError``: the base of the errors whose message is meant for the user, and
``warn_user``: a warning that points at the user's line.

The ``sanet`` command prints such an error's message alone (exit status 2); any other
exception is a bug or an environment failure and keeps its traceback. It derives from
``RuntimeError`` so that code catching ``RuntimeError`` keeps working.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Type

__all__ = ["SanetError", "SanetWarning", "is_out_of_memory", "warn_user"]


class SanetError(RuntimeError):
    """A failure the user can act on (bad file, missing kernel, wrong options); the message
    says what was wrong and what would work."""


class SanetWarning(UserWarning):
    """A warning the user can act on (``warn_user``'s). The ``sanet`` command prints it as
    ``sanet CMD: warning: ...``: the line it would point at is the console script's."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch running out of memory (CUDA or CPU): the user can act on it
    (a smaller batch), and no other diagnosis should replace it."""
    import torch

    # CUDA raises torch.cuda.OutOfMemoryError (aliased torch.OutOfMemoryError from torch 2.5);
    # the CPU allocator a plain RuntimeError; Python and NumPy (image decoding) MemoryError
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


def _library_dirs() -> tuple:
    import timm
    import torch

    return tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules[__package__], timm, torch))


def warn_user(message: str, category: Type[Warning] = SanetWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside sanet, timm and torch (what
    Python 3.12's ``skip_file_prefixes`` does): a warning raised deep in
    ``timm.create_model`` then names the user's line, not ours."""
    libraries = _library_dirs()
    frame, level = sys._getframe(1), 2  # stacklevel 2: whoever called warn_user
    while frame.f_back is not None and frame.f_code.co_filename.startswith(libraries):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
