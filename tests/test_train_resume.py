"""``kill -9`` during training, then ``--resume``: same final weights as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import torch

from engine_utils import PYTHON, load_ckpt, make_imagefolder, subprocess_env, train_argv

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
