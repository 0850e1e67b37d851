"""``SanetError``: the base of the errors whose message is meant for the user.

The ``sanet`` command prints such an error's message alone (exit status 2); any other
exception is a bug or an environment failure and keeps its traceback. It derives from
``RuntimeError`` so that code catching ``RuntimeError`` keeps working.
"""
from __future__ import annotations

__all__ = ["SanetError"]


class SanetError(RuntimeError):
    """A failure the user can act on (bad file, missing kernel, wrong options); the message
    says what was wrong and what would work."""
