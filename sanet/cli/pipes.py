"""Console streams that go quiet when their reader has gone, for long runs.

``sanet train ... | head`` (or with stderr piped into something that exits) would otherwise
stop training at the next print or progress-bar update with a BrokenPipeError. Training is
the job, and ``log.csv`` keeps every epoch: the console is optional.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any, Iterator, TextIO

__all__ = ["pipe_safe_console", "stdout_named_in_errors"]


class _PipeSafe:
    """Writes to ``stream`` until its pipe breaks, then to nowhere. The broken descriptor is
    pointed at /dev/null too, so the interpreter's own flush at exit succeeds."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._open = stream, True

    def _broken(self) -> None:
        self._open = False
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        if self._open:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._broken()
        return len(text)

    def flush(self) -> None:
        if self._open:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._broken()

    def isatty(self) -> bool:
        return self._open and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ... as the real stream's
        return getattr(self._stream, name)


@contextlib.contextmanager
def pipe_safe_console() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` as :class:`_PipeSafe` streams for the block."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeSafe(sys.stdout), _PipeSafe(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


class _NamedStdout:
    """``sys.stdout`` whose write errors name it: a full disk under ``sanet ... > file`` is
    otherwise a bare "[Errno 28] No space left on device" that doesn't say which file.
    A closed pipe's BrokenPipeError passes unchanged (the callers treat it as no error)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror, "standard output") from exc

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def stdout_named_in_errors() -> Iterator[None]:
    """``sys.stdout`` as :class:`_NamedStdout` for the block."""
    saved = sys.stdout
    sys.stdout = _NamedStdout(saved)
    try:
        yield
    finally:
        sys.stdout = saved
