"""Building the CPU extension: finding the ninja that pip installed (without a rebuild)."""
from __future__ import annotations

import os
import shutil
import sys

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
