"""The run folder of ``sanet train`` (``--output``): refuse to overwrite a run by accident, and
make ``--overwrite`` lose the previous run only once the new one has a checkpoint.

``--overwrite`` moves the previous run's files into ``OUT/.replaced-run`` and deletes them
after the new run's first ``last.pt`` is written; a run that fails, or is interrupted (Ctrl-C,
or the SIGTERM torchrun sends when another process failed), before that puts them back. A
``kill -9`` in that window leaves them in ``.replaced-run``, where :func:`check_output` finds
them and says so. Files that could not be deleted stay in ``.replaced-run.<pid>.discarded``
(reported then) until the next run in OUT removes them.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, List

from ..checkpoint import remove_stale_temps

__all__ = ["RUN_FILES", "REPLACED_DIR", "LOCK_FILE", "check_output", "check_output_outside_data",
           "check_not_busy", "claim_output", "prepare_output", "overwrite_guard", "restore_replaced"]

#: What a run writes into OUT (all of it goes when --overwrite starts afresh).
RUN_FILES = ("last.pt", "best.pt", "log.csv", "curves.png", "tb")
#: Where --overwrite keeps the previous run until the new one has a checkpoint.
REPLACED_DIR = ".replaced-run"
#: Locked by the run writing into OUT (rank 0), so that a second run can't write there too.
LOCK_FILE = ".sanet-train.lock"
# Files that mean OUT holds a run worth keeping (tb/ alone is a run stopped in its 1st epoch).
_RUN_RECORDS = ("last.pt", "best.pt", "log.csv")


def check_output(out: Path, *, resume: bool, overwrite: bool, writable: bool = True) -> None:
    """Refuse to silently overwrite a previous run, or to write into a file; with ``writable``
    (rank 0, the process that writes), also a folder that can't take new files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; give a folder (it receives last.pt, best.pt, "
                         "log.csv, tb/ and curves.png)")
    replaced = out / REPLACED_DIR
    if replaced.exists() and not overwrite:
        raise ValueError(f"{out}: --overwrite moved a previous run's files into {replaced} and was killed "
                         "before the new run wrote a checkpoint. To keep that run, delete what the killed run "
                         f"wrote in {out} (tb/, and log.csv if there is one) and move the files in {replaced} "
                         "back (then --resume continues it); or pass --overwrite to discard them")
    held = [name for name in _RUN_RECORDS if (out / name).exists()]
    if held and not (resume or overwrite):
        raise ValueError(f"{out} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                         "--overwrite to start afresh, or choose another --output")
    # The folder, or the nearest one above it that exists, must take new files: checked now,
    # not after the data and model are loaded (and TensorBoard's writer thread has started).
    existing = next(p for p in (out, *out.absolute().parents) if p.exists() or p.is_symlink())
    if not existing.exists():  # a link to nothing, e.g. to a file system that is not mounted
        raise ValueError(f"--output {out}: {existing} is a symbolic link to {os.readlink(existing)}, which does "
                         "not exist (not mounted?); create its target or choose another --output")
    if not existing.is_dir():
        raise ValueError(f"--output {out}: {existing} is a file, so no folder can be made there")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {out}: {existing} is not writable (read-only or not yours); "
                         "choose another --output")


def check_output_outside_data(out: Path, data: Path) -> None:
    """The run's folder may not be inside ``data/train`` or ``data/val``: it would become a
    class folder there, and its curves.png a training or validation image."""
    where = out.resolve()
    for split in ("train", "val"):
        folder = (data / split).resolve()
        if where == folder or folder in where.parents:
            raise ValueError(f"--output {out} is inside {data / split}: the run's files (curves.png) would be "
                             f"read as images of a class there; choose a folder outside {data / 'train'} "
                             f"and {data / 'val'}")


def check_not_busy(out: Path) -> None:
    """Refuse early (before data and model load) if a run is writing into ``out``. Rank 0 only:
    the probe takes the lock for a moment."""
    if (out / LOCK_FILE).is_file():
        with _output_lock(out):
            pass


@contextmanager
def claim_output(out: Path, *, overwrite: bool, main: bool,
                 say: Callable[[str], None]) -> Iterator[Callable[[], None]]:
    """The run's hold on ``out``, for its whole length: on rank 0 (``main``) the lock, then
    :func:`prepare_output` (its notes go to ``say``); on every rank :func:`overwrite_guard`,
    whose ``checkpointed`` it yields."""
    with _output_lock(out) if main else nullcontext():
        if main:
            for note in prepare_output(out, overwrite=overwrite):
                say(note)
        with overwrite_guard(out, active=main) as checkpointed:
            yield checkpointed


@contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``OUT/.sanet-train.lock`` (the kernel releases it when the
    process ends, ``kill -9`` included, so it never goes stale). Where locks are not available
    (Windows, some network file systems) the run goes on unguarded."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # check_output ran before the data loaded; this is what it can't foresee
        raise ValueError(f"--output {out}: cannot create the folder ({exc.strerror or exc}); choose another "
                         "--output") from None
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"--output {out}: another sanet train (process {holder}) is writing into this folder; wait for it "
                "to end, stop it, or choose another --output. (Under torchrun, stop the worker processes: "
                "torchrun starts them in a session of their own, so killing torchrun alone leaves them "
                "running.)") from None
        except OSError:  # no locks on this file system
            pass
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def prepare_output(out: Path, *, overwrite: bool) -> List[str]:
    """Create the run folder; with ``overwrite``, move the previous run aside (see the module
    docstring). Returns notes for the user (unfinished writes removed). Rank 0 only."""
    notes = []
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        replaced = out / REPLACED_DIR
        if replaced.exists():  # an earlier --overwrite interrupted: the user asked to discard it again
            shutil.rmtree(replaced)
        moved = [name for name in RUN_FILES if (out / name).exists()]
        if moved:
            replaced.mkdir()
            for name in moved:
                os.replace(out / name, replaced / name)
    for trash in sorted(out.glob(f"{REPLACED_DIR}.*.discarded")):  # an earlier run's failed delete
        shutil.rmtree(trash, ignore_errors=True)
        if not trash.exists():
            notes.append(f"removed {trash.name}, files of a replaced run that an earlier run could not delete")
    for name in ("last.pt", "best.pt", "log.csv", "curves.png"):  # left by a kill during a write; the files are intact
        for tmp in remove_stale_temps(out / name):
            notes.append(f"removed {tmp.name}, an unfinished write of {name} from an interrupted run")
    return notes


class _Terminated(BaseException):
    """SIGTERM turned into an exception, so that the guard can restore before exiting."""


@contextmanager
def overwrite_guard(out: Path, *, active: bool) -> Iterator[Callable[[], None]]:
    """Around a run that ``prepare_output`` may have moved a previous run aside for (``active``:
    this process did it). Yields ``checkpointed``, to call once the new run's ``last.pt`` is
    written: the previous run's files then go. Until then, any exception (Ctrl-C included)
    and SIGTERM put them back before the process stops; the exception then carries
    ``previous_run_restored = True`` (the CLI's Ctrl-C hint depends on it)."""
    pending = active and (out / REPLACED_DIR).is_dir()
    # torchrun stops the other processes with SIGTERM when one fails, and by default that ends
    # Python without running except/finally blocks. (signal.signal works in the main thread only.)
    installed = pending and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if installed else None

    def uninstall() -> None:
        nonlocal installed
        if installed:
            signal.signal(signal.SIGTERM, previous)
            installed = False

    def checkpointed() -> None:
        nonlocal pending
        if pending:
            pending = False  # first: from here on the new run is the one to keep
            uninstall()
            _discard(out / REPLACED_DIR)

    try:
        yield checkpointed
    except BaseException as exc:
        if pending:
            pending = False
            if installed:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # not twice, not mid-restore
            if restore_replaced(out):
                exc.previous_run_restored = True
                print(f"sanet train: the new run stopped before its first checkpoint; the previous run in {out} "
                      "is restored, unchanged", file=sys.stderr, flush=True)
        if isinstance(exc, _Terminated):
            stop = SystemExit(128 + signal.SIGTERM)
            stop.previous_run_restored = getattr(exc, "previous_run_restored", False)  # for the CLI's message
            raise stop from None
        raise
    finally:
        uninstall()


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _discard(replaced: Path) -> None:
    """Delete the previous run's files: first renamed out of the way in one step (a
    ``.replaced-run`` left behind would read as an interrupted --overwrite), then removed;
    what can't be removed is reported, not hidden."""
    trash = replaced.with_name(f"{REPLACED_DIR}.{os.getpid()}.discarded")
    try:
        os.replace(replaced, trash)
    except OSError:  # (a leftover of that name): delete in place
        trash = replaced
    shutil.rmtree(trash, ignore_errors=True)
    if trash.exists():
        print(f"sanet train: could not delete all of the replaced run's files; what is left is in {trash} "
              "(safe to delete)", file=sys.stderr, flush=True)


def restore_replaced(out: Path) -> bool:
    """The new run stopped before its first checkpoint: remove what it wrote and put the
    previous run's files back. Returns whether there was anything to restore."""
    replaced = out / REPLACED_DIR
    if not replaced.is_dir():
        return False
    for name in RUN_FILES:
        kept, new = replaced / name, out / name
        if new.is_dir():
            shutil.rmtree(new)
        elif new.exists():
            new.unlink()
        if kept.exists():
            os.replace(kept, new)
    shutil.rmtree(replaced)
    return True
