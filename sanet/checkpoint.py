"""Safe checkpoint I/O: never unpickle code, never lose the last good file.

* Reading: the format comes from the file's first bytes, not its name: safetensors (ours), or
  ``torch.load(..., weights_only=True)`` (a file that needs arbitrary pickled objects is
  refused with :class:`UnsafeCheckpointError`, and nothing in it runs).
* Writing: to a temporary file in the same directory, fsync, then ``os.replace`` — a crash
  or ``kill -9`` mid-write leaves the previous file intact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from safetensors.torch import load_file as _st_load
from safetensors.torch import save as _st_bytes
from torch import Tensor, nn

from .errors import SanetError

__all__ = [
    "RUN_METADATA",
    "UnsafeCheckpointError",
    "atomic_write",
    "atomic_torch_save",
    "converted_run_metadata",
    "load_checkpoint_file",
    "load_state_dict_file",
    "load_weights",
    "model_card",
    "remove_stale_temps",
    "safetensors_metadata",
    "SANET_MARK",
    "save_safetensors",
    "sha256_file",
    "state_dict_from",
    "write_json_atomic",
]

PathLike = Union[str, os.PathLike]

# The process's umask, read once at import: os.umask can only be read by setting it, which
# would briefly change it for every thread.
_UMASK = os.umask(0)
os.umask(_UMASK)


#: What ``sanet convert`` keeps of a ``sanet train`` checkpoint beyond its weights, as JSON
#: strings in the safetensors metadata, so that ``sanet eval``/``predict`` of the converted file
#: use the run's class names, image size, crop and model kwargs as they do for the checkpoint.
RUN_METADATA = ("class_names", "img_size", "crop_pct", "interpolation", "model_kwargs")


class UnsafeCheckpointError(SanetError):
    """The file holds pickled objects beyond plain tensors/containers; it was not executed."""


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then atomically replace ``path`` (through a symlink:
    the file it points to is replaced, the link kept)."""
    path = Path(path)
    if path.is_symlink():  # os.replace would put the file in place of the link
        path = path.resolve()
    if path.is_dir():  # os.replace's own message names the temporary file
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file path")
    if path.exists() and not path.is_file():  # a device, FIFO or socket would be replaced, not written
        raise ValueError(f"cannot write {path}: it is not a regular file (a device, pipe or socket); give a "
                         "file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # mkdir's messages don't say what is wrong
        blocker = next((p for p in path.absolute().parents if p.exists() or p.is_symlink()), None)
        raise NotADirectoryError(f"cannot write {path}: part of its folder path, {blocker}, is not a "
                                 "folder") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # its message names the temporary file, not the path asked for
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the mode open() would
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temps(path: PathLike) -> List[Path]:
    """Delete the temporary files that writes of ``path`` killed mid-way (``kill -9``) left
    behind; returns them. Only call it when nothing else is writing ``path``."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))  # atomic_write's mkstemp names
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a half-written ``path``.

    torch.save writes through a Python file object here: given a path, a full disk (or quota)
    surfaces as RuntimeError "unexpected pos ..." with no errno; through Python's write, the
    OSError (ENOSPC, EDQUOT, ...) is its context, and is what this raises."""
    def write(tmp: str) -> None:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except RuntimeError as exc:
            cause = exc.__context__
            if not isinstance(cause, OSError) or cause.errno is None:
                raise
            raise OSError(cause.errno, f"cannot write {path}: {cause.strerror}") from None
        except OSError as exc:  # the close's flush of what the buffer still held
            if exc.errno is None:
                raise
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None

    atomic_write(path, write)


def save_safetensors(state_dict: Dict[str, Tensor], path: PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state_dict as safetensors, atomically (tensors made contiguous, unshared)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    data = _sorted_metadata(_st_bytes(tensors, metadata=metadata))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _sorted_metadata(data: bytes) -> bytes:
    """The same safetensors file with its metadata keys in sorted order. safetensors writes
    them in hash-map order, which changes from call to call; sorted, the same weights and
    metadata give the same bytes (and the model card's sha256 is reproducible)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def converted_run_metadata(path: PathLike) -> Dict[str, Any]:
    """The ``RUN_METADATA`` that ``sanet convert`` kept in a safetensors file, decoded from
    their JSON strings (empty for any other file)."""
    meta = safetensors_metadata(path)
    found: Dict[str, Any] = {}
    for key in RUN_METADATA:
        if key in meta:
            try:
                found[key] = json.loads(meta[key])
            except ValueError:
                raise SanetError(f"{path}: its metadata entry {key!r} is not JSON ({meta[key][:80]!r}); "
                                 "convert the checkpoint again with sanet convert") from None
    return found


#: The metadata key that marks a safetensors file as written by ``sanet convert`` (its value:
#: sanet's version). Other tools' files may use the same key names for other things.
SANET_MARK = "sanet_version"
#: What ``sanet convert`` wrote before it wrote the mark: those files count as sanet's too.
_UNMARKED_SANET_KEYS = frozenset({"model", "num_classes", "in_chans", "source"})


def safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata ``sanet convert`` wrote into a safetensors file (``model``,
    ``num_classes``, ``in_chans``, ``source``, a run's ``RUN_METADATA``, ...); empty for any
    other file, including another tool's safetensors file: its metadata ("interpolation":
    "bicubic", "model": "resnet50") means what that tool meant, and is not read."""
    from safetensors import safe_open

    path = Path(path)
    if not (path.is_file() and _is_safetensors(path)):
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # safetensors raises its own error types; the loader reports them
        return {}
    return meta if SANET_MARK in meta or _UNMARKED_SANET_KEYS <= meta.keys() else {}


def _unsafe_globals(path: Path) -> str:
    """The non-allowlisted globals a pickle refers to (read without executing anything)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return ""
    return f" ({', '.join(names[:5])})" if names else ""


# safetensors refuses headers above 100 MB; a larger "size" means the bytes are something else.
_MAX_SAFETENSORS_HEADER = 100_000_000


def _starts_like_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header size, then a JSON header.
    (torch.save's zip starts with ``PK``, its legacy pickle with the PROTO opcode.)"""
    head = _head(path, 9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _MAX_SAFETENSORS_HEADER


def _is_safetensors(path: Path) -> bool:
    """Starts like safetensors and its header fits in the file."""
    return _starts_like_safetensors(path) and 8 + int.from_bytes(_head(path, 8), "little") <= path.stat().st_size


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


#: First bytes of files a weights option is given by mistake (an image to classify, the
#: model card sanet convert writes beside the weights).
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _what_it_looks_like(head: bytes) -> Optional[str]:
    """What a file that is no checkpoint is, when its first bytes say (else None)."""
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            return f"a {kind} image, not weights"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WEBP image, not weights"
    if head.lstrip()[:1] in (b"{", b"["):
        return ("a JSON file (if it is the model card OUT.json that sanet convert writes, the weights "
                "are OUT.safetensors beside it)")
    return None


def _starts_like_torch_save(path: Path) -> bool:
    """A zip archive (torch.save's format since 1.6) or a binary pickle (legacy format: the
    PROTO opcode first). Anything else fails to unpickle because it is not a checkpoint."""
    head = _head(path, 4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _protocol_of(path: Path) -> str:
    """`` of protocol N`` as the pickle's PROTO opcode says (inside a torch.save zip archive, its
    data.pkl's), or empty when it can't be read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
                head = z.open(name).read(2)
        else:
            head = _head(path, 2)
    except Exception:  # only the message's detail is lost
        return ""
    return f" of protocol {head[1]}" if head[:1] == b"\x80" and len(head) == 2 else ""


def load_checkpoint_file(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """Load a checkpoint without executing pickled code (safetensors or weights_only).

    The format is read from the file's first bytes, never its name: a safetensors file named
    ``.pth`` loads as safetensors, a ``torch.save`` file named ``.safetensors`` with torch.load."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file (give the file, e.g. {path}/last.pt "
                                "of a sanet train run)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _starts_like_safetensors(path):  # by content only: a torch.save file named .safetensors loads too
        try:
            return _st_load(str(path), device=str(map_location))
        except Exception as exc:  # safetensors raises its own error types
            raise SanetError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        # An open file, not the path: torch.load reads a path ending in .safetensors as safetensors.
        # argparse.Namespace is allowed as timm allows it: timm's train.py stores its args as
        # one (unpickling it only fills an attribute dict; its values are checked as usual).
        with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]), \
                warnings.catch_warnings():
            # a legacy file of protocol > 2 warns, then fails below with our own message
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _starts_like_torch_save(path):
            head = _head(path)
            raise SanetError(
                f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a binary "
                f"pickle; this file starts with {head!r}: "
                f"{_what_it_looks_like(head) or 'a web page or an interrupted download?'})"
            ) from None
        if "Unsupported operand" in str(exc):  # an opcode of pickle protocol 3+ it doesn't implement
            raise SanetError(
                f"{path}: a pickle{_protocol_of(path)} (torch.save(..., pickle_protocol=N) with N > 2, or a "
                "pickle.dump file) whose instructions torch.load(weights_only=True) "
                "can't read, so what it holds could not be checked; nothing in it ran. If you trust the file, "
                "re-save its state_dict with torch.save (default protocol) in a trusted environment"
            ) from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load. The file contains pickled objects other than tensors "
            f"and plain containers{_unsafe_globals(path)}, which could run code; sanet loads "
            "checkpoints with torch.load(weights_only=True) and executed nothing from it. If "
            "you trust the file, re-save only its state_dict in a trusted environment."
        ) from None
    except PermissionError:
        raise  # the file may be fine: the CLI reports it as it is
    except (EOFError, IndexError, KeyError, ValueError, RuntimeError, OSError) as exc:
        # Truncated or foreign files fail inside the unpickler or the zip reader (which, for
        # some cut lengths, seeks before the start: OSError "Invalid argument").
        kind = None if _starts_like_torch_save(path) else _what_it_looks_like(_head(path))
        raise SanetError(
            f"{path}: not a PyTorch checkpoint, or a damaged one ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unexpected end of data'})"
            + (f"; the file is {kind}" if kind else "")
        ) from None


def load_state_dict_file(path: PathLike) -> Dict[str, Tensor]:
    """The model weights inside a checkpoint (authors' layout, ours, or a bare state_dict)."""
    return state_dict_from(load_checkpoint_file(path), path)


def state_dict_from(obj: Any, path: PathLike) -> Dict[str, Tensor]:
    """The model weights inside a loaded checkpoint ``obj`` (read from ``path``)."""
    from .models.checkpoint_filter import weights_of

    if not isinstance(obj, dict):
        raise SanetError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    weights = weights_of(obj)
    if not weights:
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise SanetError(f"{path}: no weights found: expected a state_dict (name -> tensor), or one under "
                         f"'state_dict' or 'model'; the file's top-level keys are {keys or 'none'}")
    return weights


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load weights from ``path`` into ``model`` strictly (clear error listing mismatches).

    ``model`` may be wrapped (DataParallel/DDP, ``torch.compile``): the weights go into the
    module inside, whose names the file's keys carry once the wrappers' prefixes are stripped."""
    from .models.checkpoint_filter import check_state_dict

    inner = _unwrap(model)
    inner.load_state_dict(check_state_dict(load_state_dict_file(path), inner, source=str(path)))
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DataParallel/DDP (``.module``) and ``torch.compile`` (``._orig_mod``).
    By type, not timm's ``unwrap_model``: that unwraps any model with an attribute named
    ``module``, which a user's own model may well have."""
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model, OptimizedModule):
            model = model._orig_mod
        else:
            return model


def model_card(model_name: str, source: PathLike, out: PathLike, num_params: int) -> Dict[str, Any]:
    """Small JSON description written next to converted weights."""
    from . import __version__

    return {
        "model": model_name,
        "source_file": os.path.basename(str(source)),
        "source_sha256": sha256_file(source),
        "weights_file": os.path.basename(str(out)),
        "weights_sha256": sha256_file(out),
        "num_params": num_params,
        "format": "safetensors",
        "sanet_version": __version__,
        "torch_version": torch.__version__,
    }


def write_json_atomic(obj: Any, path: PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)
