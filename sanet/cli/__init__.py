"""The ``sanet`` command. Each subcommand lives in its own module with two functions:
``add_parser(subparsers, name)`` (its arguments and help, as subcommand ``name``) and
``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import List, Optional

from .pipes import stdout_named_in_errors

__all__ = ["main", "build_parser", "COMMANDS"]

#: subcommand -> module (in this package). Order is the order of ``sanet --help``.
COMMANDS = {
    "models": "models_cmd",
    "info": "info",
    "convert": "convert",
    "bench": "bench",
    "ext": "ext",
    "train": "train",
    "eval": "evaluate",
    "predict": "predict",
}


class _Parser(argparse.ArgumentParser):
    """argparse, plus the error object on stdout for a usage error when ``--json`` was asked
    for: a machine reading stdout gets one JSON object whatever went wrong."""

    argv: List[str] = []  # set by main(): the raw arguments

    def __init__(self, *args, **kwargs) -> None:
        # No prefixes of long options: "--jso" would not be the "--json" that error() looks
        # for, and a prefix that later gains a second match breaks scripts.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if "--json" in _Parser.argv and os.environ.get("RANK", "0") == "0":  # one object per job
            # "sanet train" for a subcommand's errors; the top parser's (a missing or
            # unknown subcommand) may name the subcommand among the arguments
            command = self.prog.split(" ", 1)[1] if " " in self.prog else next(
                (a for a in _Parser.argv if a in COMMANDS), None)
            _print_error_object({"error": message, "command": command})
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="sanet",
        description="Shuffle Attention (SA-Net, ICASSP 2021): models, weights, training, benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"sanet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.subcommands = {}  # name -> its parser, for errors with the subcommand's usage
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f".{module}", __name__)
        p = mod.add_parser(sub, name)
        p.set_defaults(_run=mod.run)
        parser.subcommands[name] = p
    return parser


def _did_you_mean(parser: argparse.ArgumentParser, unknown: List[str]) -> str:
    """" (did you mean --epochs?)" for a mistyped long option such as --epoch, or one given
    with a single dash (-epochs) (argparse names only what it did not recognise); "" when no
    option is close."""
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    flags = [token.split("=", 1)[0] for token in unknown
             if token.startswith("--") or (token.startswith("-") and len(token) > 2 and token[1].isalpha())]
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag if flag.startswith("--") else "-" + flag, options, n=1, cutoff=0.75)
        if close:
            hints.append(close[0] if len(flags) == 1 else f"{close[0]} for {flag}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    _Parser.argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would print the top-level usage, without the subcommand's options
        sub = parser.subcommands[args.command]
        sub.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(sub, unknown)}")
    _SIGINT["received"] = False
    previous = {}
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            # torchrun stops the other processes with SIGTERM when one fails, and job schedulers
            # and `kill` stop jobs with it: by default that ends Python silently, without the
            # --json object (or, for train, the hint on how to go on).
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with stdout_named_in_errors(), _warnings_named(args.command):
            code = int(args._run(args) or 0)
            # here, not at the interpreter's exit: a failed write (full disk) is then this
            # command's error, said clearly, rather than "Exception ignored" and status 120
            sys.stdout.flush()
            return code
    except KeyboardInterrupt as exc:
        return _report_interrupt(args, exc)
    except _Terminated as exc:
        return _report_terminated(args, exc)
    except SystemExit as exc:  # `sanet train`'s own SIGTERM handler (run_dir.overwrite_guard) ends so
        if exc.code == 128 + signal.SIGTERM:
            return _report_terminated(args, exc)
        raise
    except BrokenPipeError:
        # Output piped into e.g. `head`, which closed early: not an error of ours.
        sys.stderr.close()
        return 0
    except Exception as exc:
        if _SIGINT["received"] and not getattr(args, "debug", False):
            # Ctrl-C landed where Python drops KeyboardInterrupt (e.g. while DataLoader workers
            # start: they die of the same signal and the loader then fails): this error is its echo.
            return _report_interrupt(args, exc)
        if not _for_the_user(exc) or getattr(args, "debug", False):
            raise  # a bug or an environment failure: its traceback is what a report needs
        message = _describe(exc, args.command)
        print(f"sanet {args.command}: error: {message}", file=sys.stderr)
        if _in_torchrun() and _is_peer_failure(exc):
            # Rank 0 only saw the backend notice that a peer left: its own error is elsewhere.
            _json_error(args, f"another process of this torchrun job failed first; its error is in the "
                              f"log (stderr), prefixed 'sanet {args.command}: error:'", detail=str(exc))
        else:
            _json_error(args, message)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _warnings_named(command: str):
    """Our user-facing warnings (``SanetWarning``) as one line, ``sanet CMD: warning: ...``, like
    the errors: Python's format would point at the console script's ``sys.exit(main())``.
    Filters (``-W error``, ``PYTHONWARNINGS``) still apply; other warnings keep their format."""
    from sanet.errors import SanetWarning

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SanetWarning):
            print(f"sanet {command}: warning: {message}", file=sys.stderr if file is None else file, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


_SIGINT = {"received": False}  # set by _on_sigint during main()


def _on_sigint(signum, frame) -> None:
    """Python's own SIGINT behaviour (KeyboardInterrupt), remembered: where Python can't raise
    it, the error that follows is reported as the interruption it is."""
    _SIGINT["received"] = True
    raise KeyboardInterrupt


class _Terminated(BaseException):
    """SIGTERM (a BaseException, like KeyboardInterrupt: no `except Exception` stops it)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


_TERMINATED = ("stopped by SIGTERM: torchrun stops every process when one fails (its error is in the log, "
               "prefixed 'sanet ...: error:'), or the job was stopped")


def _report_terminated(args: argparse.Namespace, exc: BaseException) -> int:
    if _in_torchrun():
        message = _TERMINATED
    else:  # what Ctrl-C would say, for the signal it was (train: how to go on)
        message = "stopped by SIGTERM" + _interrupted(args, exc)[len("interrupted"):]
    print(f"sanet {args.command}: {message}", file=sys.stderr)
    _json_error(args, message)
    return 128 + signal.SIGTERM


def _report_interrupt(args: argparse.Namespace, exc: BaseException) -> int:
    message = _interrupted(args, exc)
    print(f"sanet {args.command}: {message}", file=sys.stderr)  # named, as every error and SIGTERM are
    _json_error(args, message)
    return 130


def _interrupted(args: argparse.Namespace, exc: BaseException) -> str:
    """What Ctrl-C left behind. For ``train``, rank 0 says how to go on (the other processes
    of a torchrun job don't know: rank 0 may have just put a previous run back)."""
    if args.command != "train" or os.environ.get("RANK", "0") != "0":
        return "interrupted"
    if getattr(exc, "previous_run_restored", False):  # --overwrite, stopped before its first checkpoint
        return ("interrupted before the new run's first checkpoint; the previous run is back in place, "
                "unchanged (the same command, with --overwrite, starts afresh)")
    out = Path(args.output)
    if (out / "last.pt").is_file():
        return ("interrupted (the same command with --resume, instead of any --overwrite, continues from the "
                "last completed epoch)")
    if (out / "log.csv").is_file():  # stopped between the first epoch's log.csv and its last.pt
        return ("interrupted before the run's first checkpoint: there is nothing to resume; the same command "
                "with --overwrite starts afresh (the folder holds the interrupted epoch's log.csv)")
    return "interrupted before the run's first checkpoint: there is nothing to resume (the same command starts afresh)"


def _json_error(args: argparse.Namespace, message: str, **extra: str) -> None:
    """With --json, a machine reading stdout gets one JSON object on failure too (rank 0's)."""
    if getattr(args, "json", False) and os.environ.get("RANK", "0") == "0":
        _print_error_object({"error": message, "command": args.command, **extra})


def _print_error_object(obj: dict) -> None:
    """The --json error object on stdout. A stdout that can't take it (a reader that closed the
    pipe, a full disk: often the very error being reported) loses only this object: the error
    is on stderr too, and the exit status stays the error's, with no traceback."""
    try:
        print(json.dumps(obj), flush=True)
    except OSError:
        # What the write left in the buffer would fail again at exit ("Exception ignored"):
        # it goes to /dev/null instead.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def _in_torchrun() -> bool:
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def _for_the_user(exc: BaseException) -> bool:
    """Errors whose message says what the user did wrong (and so needs no traceback): ours,
    bad values, files that are missing, unwritable or in the wrong place, a full disk, running
    out of memory, and a torchrun peer's failure."""
    from ..errors import SanetError, is_out_of_memory

    return isinstance(exc, (SanetError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError,
                            IsADirectoryError, FileExistsError)) \
        or (isinstance(exc, OSError) and exc.errno in _USER_ERRNOS) or is_out_of_memory(exc) \
        or _is_peer_failure(exc)


# OSErrors about the paths the user gave: a read-only file system, a full disk or quota, a
# name too long, a loop of symbolic links.
_USER_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}


# What to make smaller when a command runs out of memory.
_OOM_HINTS = {"bench": "smaller --shapes (layers) or --batch-size / --img-size (models)"}


def _describe(exc: BaseException, command: Optional[str] = None) -> str:
    """The error for the user. Under torchrun, a process whose peer stopped (a user error
    there, e.g. an unreadable image) fails inside a collective with a backend message."""
    from ..engine.data import clean_worker_error
    from ..errors import is_out_of_memory

    text = clean_worker_error(exc)  # an error re-raised from a DataLoader worker carries its traceback
    if is_out_of_memory(exc):
        first = (text.splitlines() or [type(exc).__name__])[0]  # Python's MemoryError has no message
        text = f"out of memory ({first}); try {_OOM_HINTS.get(command, 'a smaller --batch-size')}"
    if _in_torchrun() and _is_peer_failure(exc):
        text += (" [another process of this torchrun job probably failed first: its own error "
                 "is in the log, prefixed 'sanet ...: error:']")
    return text


def _is_peer_failure(exc: BaseException) -> bool:
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    # gloo's wording when the other end of a pair went away (it closed, or reset the connection)
    return isinstance(exc, DistError) or any(m in str(exc) for m in _PEER_GONE)


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")
