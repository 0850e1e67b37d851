"""The run folder: ``--overwrite`` loses the previous run only once the new one has a
checkpoint, and a folder holding any record of a run (last.pt, best.pt, log.csv) is not
overwritten without ``--resume`` or ``--overwrite``."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from engine_utils import run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def run(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out))[0] == 0
    return out


def _files(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("error", [RuntimeError("boom in epoch 1"), KeyboardInterrupt()])
def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_previous_run(
        capsys, run, data, monkeypatch, error):
    before = _files(run)
    assert {"last.pt", "best.pt", "log.csv", "curves.png"} <= set(before)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("sanet.engine.trainer.train_one_epoch", fail)
    from sanet.cli import main

    if isinstance(error, KeyboardInterrupt):
        assert main(train_argv(data, run, "--overwrite", "--json")) == 130  # main reports Ctrl-C
        message = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
        # not "--resume": that would continue the previous run with this command's options
        assert "previous run is back in place" in message and "--resume" not in message
    else:
        with pytest.raises(RuntimeError, match="boom"):  # a bug's traceback propagates
            main(train_argv(data, run, "--overwrite"))
        assert "the previous run in" in capsys.readouterr().err
    assert _files(run) == before  # every file back, byte for byte
    assert not (run / ".replaced-run").exists()


def test_sigterm_before_the_first_checkpoint_restores_the_previous_run(capsys, run, data, monkeypatch):
    """torchrun stops the other processes with SIGTERM when one fails; Python's default
    action would end the process with the previous run still moved aside."""
    before, handler = _files(run), signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not turned into an exception")

    monkeypatch.setattr("sanet.engine.trainer.train_one_epoch", terminated)
    from sanet.cli import main

    code = main(train_argv(data, run, "--overwrite", "--json"))
    out, err = capsys.readouterr()
    assert code == 128 + signal.SIGTERM
    message = ("stopped by SIGTERM before the new run's first checkpoint; the previous run is back in place, "
               "unchanged")
    assert message in err and json.loads(out.splitlines()[-1])["error"].startswith(message)
    assert _files(run) == before and not (run / ".replaced-run").exists()
    assert signal.getsignal(signal.SIGTERM) == handler  # the process's own handler is back


def test_files_that_cannot_be_deleted_are_reported_not_left_as_an_interrupted_overwrite(
        capsys, run, data, monkeypatch):
    from sanet.engine import run_dir

    monkeypatch.setattr(run_dir.shutil, "rmtree", lambda *a, **k: None)  # say, an immutable file
    code, _, err = run_cli(capsys, train_argv(data, run, "--overwrite", "--seed", "7"))
    assert code == 0 and "could not delete all of the replaced run's files" in err
    assert not (run / ".replaced-run").exists() and list(run.glob(".replaced-run.*.discarded"))
    monkeypatch.undo()
    code, out, err = run_cli(capsys, train_argv(data, run, "--resume", "--seed", "7", epochs=2))
    # the next run in OUT removes them, and says so
    assert code == 0 and not list(run.glob(".replaced-run.*")) and "could not delete" in out + err


def test_overwrite_discards_the_previous_run_once_the_new_one_has_a_checkpoint(capsys, run, data):
    before = (run / "last.pt").read_bytes()
    assert run_cli(capsys, train_argv(data, run, "--overwrite", "--seed", "7"))[0] == 0
    assert (run / "last.pt").read_bytes() != before
    assert not (run / ".replaced-run").exists()


def test_a_later_failure_keeps_the_new_runs_checkpoint(run, data, monkeypatch):
    """Past the first checkpoint the previous run is gone for good: a failure in epoch 2 keeps
    the new epoch-1 checkpoint (it must not restore the old files over it)."""
    from sanet.engine import trainer

    real, calls = trainer.train_one_epoch, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in epoch 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", fail_second)
    before = (run / "last.pt").read_bytes()
    from sanet.cli import main

    with pytest.raises(RuntimeError, match="boom in epoch 2"):
        main(train_argv(data, run, "--overwrite", "--seed", "7", epochs=2))
    assert len(calls) == 2
    assert (run / "last.pt").exists() and (run / "last.pt").read_bytes() != before
    assert not (run / ".replaced-run").exists()


@pytest.mark.parametrize("kept", ["best.pt", "log.csv", "last.pt"])
def test_any_record_of_a_run_is_not_overwritten_silently(capsys, run, data, kept):
    for name in ("last.pt", "best.pt", "log.csv"):
        if name != kept:
            (run / name).unlink()
    before = (run / kept).read_bytes()
    code, _, err = run_cli(capsys, train_argv(data, run))
    assert code == 2 and "already holds a run" in err and kept in err
    assert (run / kept).read_bytes() == before


def test_files_moved_aside_by_an_interrupted_overwrite_are_reported(capsys, run, data):
    """A kill -9 between --overwrite moving the old run aside and the new run's first
    checkpoint leaves the old files in .replaced-run: a later command says where they are."""
    aside = run / ".replaced-run"
    aside.mkdir()
    for name in ("last.pt", "best.pt", "log.csv"):
        (run / name).rename(aside / name)
    code, _, err = run_cli(capsys, train_argv(data, run))
    assert code == 2 and ".replaced-run" in err and "delete what the killed run wrote" in err and "tb/" in err
    code, _, err = run_cli(capsys, train_argv(data, run, "--resume"))
    assert code == 2 and ".replaced-run" in err
    assert (aside / "last.pt").exists()
    # --overwrite again: the user discards them
    assert run_cli(capsys, train_argv(data, run, "--overwrite"))[0] == 0
    assert not aside.exists() and (run / "last.pt").exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(capsys, run, data, monkeypatch):
    """torchrun starts its workers in a session of their own: a kill -9 of torchrun alone
    leaves them training, and a --resume started then would write into the same files."""
    from sanet.engine import run_dir

    before = _files(run)
    with run_dir._output_lock(run):  # the running job's hold (a different open file: flock conflicts)
        monkeypatch.setattr("sanet.engine.trainer.open_train_val", lambda *a: pytest.fail("data loaded"))
        code, _, err = run_cli(capsys, train_argv(data, run, "--resume", epochs=2))
        assert code == 2 and f"another sanet train (process {os.getpid()}) is writing into this folder" in err
        assert "torchrun" in err
        monkeypatch.undo()
        # and if it got past the early check (started in the same instant), it stops before touching OUT
        monkeypatch.setattr(run_dir, "check_not_busy", lambda out: None)
        monkeypatch.setattr("sanet.engine.trainer.check_not_busy", lambda out: None)
        code, _, err = run_cli(capsys, train_argv(data, run, "--overwrite"))
        assert code == 2 and "is writing into this folder" in err
    assert _files(run) == before and not (run / ".replaced-run").exists()
    monkeypatch.undo()
    # the lock goes with its process (kill -9 included): nothing stale blocks the next run
    assert run_cli(capsys, train_argv(data, run, "--resume", epochs=2))[0] == 0
