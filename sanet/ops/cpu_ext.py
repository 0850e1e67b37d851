"""Build (once, cached) and load the fused CPU kernels in ``csrc/`` (``shuffle_attention.cpp``
and the headers it includes).

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load` (needs a
C++ compiler; ~40 s on 2 cores) into ``$SANET_EXT_DIR`` or ``~/.cache/sanet/ext``, keyed by
the source, the torch version and the CPU's vector ISA, so an upgrade or another machine
rebuilds instead of loading a stale binary. Once built, it is imported directly, without
cpp_extension or ninja (see :func:`_import_built`). Without a compiler, SA falls back to
PyTorch ops with a one-time warning.

Environment:
    SANET_DISABLE_EXT=1  never build or load the extension (pure-PyTorch fallback).
    SANET_REQUIRE_EXT=1  raise instead of falling back when the build fails (CI uses this).
    SANET_EXT_DIR        cache directory for the compiled extension.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import torch

from ..errors import SanetError

__all__ = ["load_cpu_ext", "cpu_ext_status"]

_CSRC = Path(__file__).parent / "csrc"
_SRC = _CSRC / "shuffle_attention.cpp"  # the translation unit; it includes the headers
_FILES = (_SRC, *sorted(_CSRC.glob("*.h")))

# ATen's Vectorized<T> picks its width from these macros; they must match compiler flags.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_status: dict = {"loaded": False, "error": None, "path": None}


def _isa() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return "DEFAULT"


def _flags() -> List[str]:
    # -fopenmp: at::parallel_for is inlined from ATen's headers and is serial without
    # _OPENMP. Linked as libgomp.so.1, it binds to the copy torch has already loaded, so
    # torch.set_num_threads applies and there is one thread pool.
    return ["-O3", "-fopenmp"] + _ISA_FLAGS.get(_isa(), [])


def _build_dir(name: str) -> Path:
    root = os.environ.get("SANET_EXT_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "sanet", "ext")
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source_in(build_dir: Path) -> Path:
    """The sources, copied into the build directory; returns the copy of ``_SRC``.
    cpp_extension rebuilds when the source *path* changes, so two installs (a checkout and
    site-packages) sharing the cache would rebuild in turn; the copy's path is the same for
    all. (Their content is in the key.)"""
    for path in _FILES:
        dest = build_dir / path.name
        if not dest.is_file():
            # A unique temporary name, then an atomic rename: processes (DDP ranks) and
            # threads may start at once; each writes the same bytes.
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=build_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(path.read_bytes())
            os.replace(tmp, dest)
    return build_dir / _SRC.name


def _sources_key() -> bytes:
    """Every source file's name and bytes: a change to any of them is a new build."""
    return b"".join(p.name.encode() + b"\0" + p.read_bytes() + b"\0" for p in _FILES)


def _ninja_dir() -> Optional[str]:
    """The directory of the ``ninja`` binary that the pip package (a dependency) installed,
    or None if there is none."""
    dirs = []
    try:
        import ninja  # the pip package: BIN_DIR is where its binary lives

        dirs.append(getattr(ninja, "BIN_DIR", "") or "")
    except ImportError:
        pass
    dirs.append(os.path.dirname(sys.executable))  # a venv's bin/, where pip puts console tools
    for d in dirs:
        if d and shutil.which("ninja", path=d):
            return d
    return None


def _ensure_ninja_on_path() -> None:
    """Make ``ninja`` findable for torch.utils.cpp_extension, which runs it from PATH.

    pip installs it into the environment's bin/, which is not on PATH when the environment
    isn't activated (``.venv/bin/python script.py``, ``.venv/bin/sanet``). Appended, and for
    good rather than around the build: cpp_extension runs ninja in every process that loads
    the extension (a no-op build when it is up to date), a thread loading at the same time
    would see PATH restored under it, and at the end of PATH the directory only supplies
    commands that nothing before it does."""
    if shutil.which("ninja"):
        return
    d = _ninja_dir()
    if d is not None:
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{path}{os.pathsep}{d}" if path else d


#: Written into the build directory once its library was built and imported.
_BUILT = "built.ok"


def _import_built(build_dir: Path, name: str) -> Optional[ModuleType]:
    """The library built earlier in ``build_dir``, imported without ninja; None if there is
    none (or it does not import: then cpp_extension builds it again).

    cpp_extension.load runs ninja in every process, a no-op when the build is up to date,
    but ninja 1.12 changed the command hash in its build log: with pip's ninja (1.13) in an
    activated venv and a system ninja (1.11) otherwise, each read the other's log as stale
    and rebuilt, about a minute each time (seen 42 times in an hour on a shared machine),
    rewriting a library other processes had loaded. The name holds the hash of the sources,
    flags, torch version and Python ABI, so a built library in it is the one to load."""
    from torch.utils import cpp_extension

    lib = build_dir / f"{name}{getattr(cpp_extension, 'LIB_EXT', '.so')}"
    if not ((build_dir / _BUILT).is_file() and lib.is_file()):
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, lib)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # damaged or foreign: rebuild through cpp_extension
        (build_dir / _BUILT).unlink(missing_ok=True)
        return None


def _mark_built(build_dir: Path, name: str) -> None:
    """Best effort: without the marker (a full disk, say) the next process goes through
    cpp_extension again, which is slower, not wrong."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{_BUILT}.", suffix=".tmp", dir=build_dir)
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
        os.replace(tmp, build_dir / _BUILT)
    except OSError:
        pass


@functools.lru_cache(maxsize=None)
def load_cpu_ext() -> Optional[ModuleType]:
    """The compiled extension module, or None if it is disabled or can't be built."""
    if os.environ.get("SANET_DISABLE_EXT", "") not in ("", "0"):
        _status["error"] = "disabled by SANET_DISABLE_EXT"
        return None
    # The Python ABI too: venvs of two Python versions with the same torch share the cache.
    key = hashlib.sha256(
        _sources_key() + f"{torch.__version__}|{sys.implementation.cache_tag}|{_isa()}|{_flags()}".encode()
    ).hexdigest()[:12]
    name = f"sanet_sa_cpu_{key}"
    try:
        # cpp_extension logs a CUDA_HOME notice on CPU machines that is irrelevant here.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        build_dir = _build_dir(name)
        module = _import_built(build_dir, name)
        if module is None:
            _ensure_ninja_on_path()
            if not any(build_dir.glob("*.so")):
                print("sanet: compiling the fused Shuffle Attention CPU kernels (once, about a "
                      f"minute) into {build_dir}", file=sys.stderr, flush=True)
            module = load(name=name, sources=[str(_source_in(build_dir))], extra_cflags=_flags(),
                          extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
            _mark_built(build_dir, name)
    except Exception as exc:  # no compiler, headers missing, ...
        _status["error"] = f"{type(exc).__name__}: {exc}"
        if os.environ.get("SANET_REQUIRE_EXT", "") not in ("", "0"):
            raise SanetError(f"building the fused CPU kernels failed (SANET_REQUIRE_EXT is set): {exc}") from exc
        warnings.warn(
            "sanet: the fused CPU kernels could not be built, Shuffle Attention falls back to "
            f"PyTorch ops (correct, slower). Reason: {_status['error'][:500]}", RuntimeWarning)
        return None
    _status.update(loaded=True, error=None, path=str(build_dir))
    return module


def cpu_ext_status() -> dict:
    """Whether the extension is loaded, where it lives, and why not if it isn't."""
    load_cpu_ext()
    return dict(_status, isa=_isa(), flags=_flags())
