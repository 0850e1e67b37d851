"""``--json`` error objects when stdout can't take them: a reader that closed the pipe
(``sanet ... --json | head``, a consumer that died) or a full disk (``> /dev/full``). The user
error stays the result (its message on stderr, exit status 2), with no traceback of the
failed write of the JSON object, and no second failure at the interpreter's exit flush."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sanet.cli import main

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")

# A run-time user error (check_model_name, no model built) and an argparse usage error.
RUN_ERROR = ["info", "no_such_model", "--json"]
USAGE_ERROR = ["info", "--json"]  # the model argument is missing


def _closed_pipe():
    """A text stream on a pipe whose reader has gone: writes raise BrokenPipeError (Python
    ignores SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return os.fdopen(write_end, "w")


def _dev_full():
    return open("/dev/full", "w")


def _exit_code(argv):
    """main's status for a run error, SystemExit's for a usage error (argparse exits)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, message", [
    (RUN_ERROR, "sanet info: error: unknown model 'no_such_model'"),
    (USAGE_ERROR, "the following arguments are required: model")], ids=["run-error", "usage-error"])
@pytest.mark.parametrize("open_stdout", [_closed_pipe, pytest.param(_dev_full, marks=needs_dev_full)],
                         ids=["closed-pipe", "dev-full"])
def test_an_error_is_still_exit_2_when_stdout_cannot_take_the_json(monkeypatch, capsys, open_stdout, argv,
                                                                   message):
    stream = open_stdout()
    try:
        monkeypatch.setattr(sys, "stdout", stream)
        assert _exit_code(argv) == 2
        monkeypatch.undo()
        assert message in capsys.readouterr().err
        stream.write("what the interpreter flushes at exit")
        stream.flush()  # raises unless the descriptor was pointed at /dev/null
    finally:
        monkeypatch.undo()
        stream.close()


def test_the_json_error_object_is_unchanged_when_stdout_takes_it(capsys):
    import json

    assert main(RUN_ERROR) == 2
    out = capsys.readouterr().out
    assert json.loads(out)["command"] == "info" and out.count("\n") == 1
    with pytest.raises(SystemExit):
        main(USAGE_ERROR)
    assert json.loads(capsys.readouterr().out) == {
        "error": "the following arguments are required: model", "command": "info"}


def _sanet(argv, stdout) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "sanet", *argv], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=env, timeout=120)


@needs_dev_full
def test_the_command_to_dev_full_says_the_error_without_a_traceback():
    """End to end: what the interpreter does at exit with the unwritten object counts too."""
    with open("/dev/full", "w") as full:
        proc = _sanet(RUN_ERROR, full)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert proc.stderr.strip().startswith("sanet info: error: unknown model 'no_such_model'")


@needs_dev_full
@pytest.mark.parametrize("argv", [["models"], ["models", "--json"]], ids=["table", "json"])
def test_a_full_disk_under_stdout_is_said_to_be_stdouts(monkeypatch, capsys, argv):
    """``sanet models > file`` on a full disk: the error names standard output (the bare
    "[Errno 28] No space left on device" did not say which file)."""
    stream = _dev_full()
    try:
        monkeypatch.setattr(sys, "stdout", stream)
        assert _exit_code(argv) == 2
        monkeypatch.undo()
        assert "sanet models: error: [Errno 28] No space left on device: 'standard output'" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            stream.close()


def test_a_closed_pipe_under_stdout_stays_no_error():
    """``sanet models | head -0``: the reader is gone before the table; not an error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as stdout:
        proc = _sanet(["models"], stdout)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
