"""Building the CPU extension: finding the ninja that pip installed (without a rebuild)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from sanet.ops import cpu_ext


def test_ninja_found_when_the_environment_is_not_on_path(tmp_path, monkeypatch):
    """``.venv/bin/python script.py`` without activating: PATH lacks the venv's bin/, where
    pip put ninja, and torch.utils.cpp_extension runs ``ninja`` from PATH."""
    if cpu_ext._ninja_dir() is None:
        pytest.skip("the ninja package's binary is not installed in this environment")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no ninja anywhere
    assert shutil.which("ninja") is None
    cpu_ext._ensure_ninja_on_path()
    found = shutil.which("ninja")
    assert found is not None
    assert os.path.dirname(found) == cpu_ext._ninja_dir()
    # Appended: what PATH found before still comes first.
    assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path)


def test_ninja_dir_falls_back_to_the_interpreter_directory(tmp_path, monkeypatch):
    """Without the ninja package's BIN_DIR (an older package, or none), the interpreter's own
    bin/ (a venv's, where pip puts console tools) is searched."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    ninja = fake_bin / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setitem(sys.modules, "ninja", None)  # import ninja -> ImportError
    monkeypatch.setattr(sys, "executable", str(fake_bin / "python"))
    assert cpu_ext._ninja_dir() == str(fake_bin)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cpu_ext._ensure_ninja_on_path()
    assert shutil.which("ninja") == str(ninja)


def test_path_untouched_when_ninja_is_found(monkeypatch, tmp_path):
    ninja = tmp_path / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    cpu_ext._ensure_ninja_on_path()
    assert os.environ["PATH"] == str(tmp_path)


def test_no_ninja_anywhere_leaves_path_alone(monkeypatch, tmp_path):
    """Nothing to add: cpp_extension then raises its own "Ninja is required" error, which
    load_cpu_ext reports (or raises under SANET_REQUIRE_EXT=1)."""
    monkeypatch.setitem(sys.modules, "ninja", None)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    cpu_ext._ensure_ninja_on_path()
    assert os.environ["PATH"] == str(tmp_path)


def test_a_built_library_is_imported_without_running_ninja(tmp_path):
    """A process finding the library built runs no ninja: a ninja of another version (pip's
    1.13 in an activated venv, a system 1.11 otherwise) read the other's build log as stale
    and rebuilt, about a minute each time."""
    import subprocess

    status = cpu_ext.cpu_ext_status()
    if not status["loaded"]:
        pytest.skip("fused CPU kernel unavailable")
    assert (Path(status["path"]) / cpu_ext._BUILT).is_file()
    fake = tmp_path / "bin"
    fake.mkdir()
    ran = tmp_path / "ninja-ran"
    (fake / "ninja").write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    (fake / "ninja").chmod(0o755)
    env = dict(os.environ, PATH=str(fake), SANET_EXT_DIR=str(Path(status["path"]).parent),
               SANET_REQUIRE_EXT="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("from sanet.ops.cpu_ext import cpu_ext_status; s = cpu_ext_status(); "
            "print(s['loaded'], s['path'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", status["path"]]
    assert not ran.exists()


def test_a_damaged_library_is_built_again(tmp_path):
    """A library that does not import (a build killed mid-link) is not trusted again: the
    marker goes, and cpp_extension builds it."""
    name = "sanet_sa_cpu_000000000000"
    (tmp_path / f"{name}.so").write_bytes(b"not an ELF file")
    (tmp_path / cpu_ext._BUILT).write_text(name)
    assert cpu_ext._import_built(tmp_path, name) is None
    assert not (tmp_path / cpu_ext._BUILT).exists()
    assert cpu_ext._import_built(tmp_path, name) is None  # no marker: not even tried


def test_disable_ext_zero_or_empty_keeps_the_extension():
    """SANET_DISABLE_EXT=0 (or empty) does not disable it; any other value does."""
    import subprocess

    status = cpu_ext.cpu_ext_status()
    if not status["loaded"]:
        pytest.skip("fused CPU kernel unavailable")
    env = dict(os.environ, SANET_EXT_DIR=str(Path(status["path"]).parent),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("SANET_REQUIRE_EXT", None)
    code = ("import os\nfrom sanet.ops import cpu_ext\n"
            "for v in ('0', '', '1', '0'):\n"
            "    os.environ['SANET_DISABLE_EXT'] = v\n"
            "    cpu_ext.load_cpu_ext.cache_clear()\n"
            "    print(repr(v), cpu_ext.load_cpu_ext() is not None, cpu_ext._status['error'])\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["'0' True None", "'' True None", "'1' False disabled by SANET_DISABLE_EXT",
                                       "'0' True None"], out.stdout
