"""Interrupted runs: ``kill -9`` during training then ``--resume`` (same final weights as an
uninterrupted run), kills during and between checkpoint writes (nothing lost, best.pt never
ahead of or behind last.pt after a resume)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from engine_utils import PYTHON, load_ckpt, make_imagefolder, run_cli, subprocess_env, train_argv

EPOCHS = 4


def _cmd(data, out, *extra):
    return [PYTHON, "-m", "sanet", *train_argv(data, out, "--deterministic", "--sched", "cosine",
                                               "--warmup-epochs", "1", "--lr", "0.05", *extra,
                                               epochs=EPOCHS)]


def test_kill9_then_resume_equals_uninterrupted(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=12)
    straight_out, victim_out = tmp_path / "straight", tmp_path / "victim"
    env = subprocess_env(threads=1)
    # both runs at once, one thread each: the 2 cores are used and the result does not depend on timing
    straight = subprocess.Popen(_cmd(data, straight_out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_cmd(data, victim_out), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (victim_out / "last.pt").exists():
        assert victim.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at = load_ckpt(victim_out / "last.pt")["epoch"]
    assert 1 <= killed_at < EPOCHS  # killed mid-run; the checkpoint on disk is whole

    resumed = subprocess.run(_cmd(data, victim_out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {victim_out / 'last.pt'}: {killed_at} epoch(s) done" in resumed.stdout
    _, err = straight.communicate(timeout=240)
    assert straight.returncode == 0, err

    a, b = load_ckpt(straight_out / "last.pt"), load_ckpt(victim_out / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS and a["updates"] == b["updates"]
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    for key in ("optimizer",):
        sa, sb = a[key]["state"], b[key]["state"]
        assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


@pytest.mark.usefixtures("one_thread")
def test_leftovers_of_a_killed_write_are_removed(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, epochs=1))[0] == 0
    stale = [out / ".last.pt.k9x2ab.tmp", out / ".best.pt.q1w2e3.tmp", out / ".log.csv.3kd9s1.tmp",
             out / ".curves.png.z8y7x6.tmp"]  # what kill -9 during atomic_write leaves
    for path in stale:
        path.write_bytes(b"half a file")
    code, stdout, _ = run_cli(capsys, train_argv(data, out, "--resume", epochs=2))
    assert code == 0 and all(f"removed {p.name}" in stdout for p in stale), stdout
    assert not any(p.exists() for p in stale) and load_ckpt(out / "last.pt")["epoch"] == 2


@pytest.mark.usefixtures("one_thread")
def test_last_checkpoint_is_the_commit_point_of_its_epoch(capsys, tmp_path, data, monkeypatch):
    """last.pt is what a resume continues from: the log goes before it (a kill between the two
    redoes the epoch, so the log never lags) and best.pt after it (so best.pt never holds an
    epoch that a resume redoes)."""
    import sanet.checkpoint as ckpt_mod
    import sanet.engine.logs as logs_mod

    order = []
    real_save, real_csv = ckpt_mod.atomic_torch_save, logs_mod.write_csv
    monkeypatch.setattr(ckpt_mod, "atomic_torch_save", lambda obj, path: order.append(path.name) or real_save(obj, path))
    monkeypatch.setattr(logs_mod, "write_csv", lambda rows, path: order.append(path.name) or real_csv(rows, path))
    assert run_cli(capsys, train_argv(data, tmp_path / "run", epochs=2))[0] == 0
    cut = order.index("log.csv", 1)
    epochs = [order[:cut], order[cut:]]
    for names in epochs:
        assert names[:2] == ["log.csv", "last.pt"] and names[2:] in ([], ["best.pt"]), order
    assert epochs[0] == ["log.csv", "last.pt", "best.pt"]  # the first epoch is always the best so far


@pytest.mark.usefixtures("one_thread")
def test_resume_restores_best_checkpoint_after_kill_between_writes(capsys, tmp_path, data, monkeypatch):
    import sanet.checkpoint as ckpt_mod

    out = tmp_path / "run"
    real_save = ckpt_mod.atomic_torch_save

    def die_at_best(obj, path):
        if path.name == "best.pt":
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(ckpt_mod, "atomic_torch_save", die_at_best)
    assert run_cli(capsys, train_argv(data, out, epochs=1))[0] == 130
    monkeypatch.setattr(ckpt_mod, "atomic_torch_save", real_save)
    assert not (out / "best.pt").exists() and load_ckpt(out / "last.pt")["best_epoch"] == 1
    code, stdout, _ = run_cli(capsys, train_argv(data, out, "--resume", epochs=1))
    assert code == 0 and "restored" in stdout
    assert (out / "best.pt").read_bytes() == (out / "last.pt").read_bytes()


@pytest.mark.usefixtures("one_thread")
def test_restore_best_checkpoint_only_when_last_is_the_best(tmp_path):
    from sanet.engine.state import restore_best_checkpoint

    last = {"epoch": 3, "best_epoch": 3, "model": {"w": torch.ones(2)}}
    torch.save(last, tmp_path / "last.pt")
    torch.save({"epoch": 2, "best_epoch": 2, "model": {"w": torch.zeros(2)}}, tmp_path / "best.pt")
    assert restore_best_checkpoint(tmp_path, last)  # best.pt one best behind: replaced
    assert load_ckpt(tmp_path / "best.pt")["epoch"] == 3
    assert not restore_best_checkpoint(tmp_path, last)  # now up to date: left alone
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 half a zip")
    assert restore_best_checkpoint(tmp_path, last)  # damaged: replaced
    older = {"epoch": 4, "best_epoch": 3, "model": {}}  # last.pt is not the best: best.pt is kept
    torch.save({"epoch": 2}, tmp_path / "best.pt")
    assert not restore_best_checkpoint(tmp_path, older) and load_ckpt(tmp_path / "best.pt")["epoch"] == 2


@pytest.mark.usefixtures("one_thread")
def test_interrupted_checkpoint_write_keeps_previous(capsys, tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 2:  # epoch 1 wrote best.pt and last.pt; die half-way through the next
            if hasattr(f, "write"):  # atomic_torch_save passes an open file
                f.write(b"PK\x03\x04 half a zip")
            else:
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    code, _, _ = run_cli(capsys, train_argv(data, out, epochs=2))
    assert code == 130
    monkeypatch.setattr(torch, "save", real_save)
    assert load_ckpt(out / "last.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert run_cli(capsys, train_argv(data, out, "--resume", epochs=2))[0] == 0
    assert load_ckpt(out / "last.pt")["epoch"] == 2
