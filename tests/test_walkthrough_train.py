"""User mistakes met walking through docs/training.md: each is a one-line error that says what
differs and what to pass, and leaves the run's files as they were."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from engine_utils import run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_on_renamed_class_folder_names_the_difference(capsys, tmp_path, data, trained_run):
    # the message showed each side's first five classes only: a renamed or added sixth class
    # read "trained on 10 classes ['0', '1', '2', '3', '4']..., but --data has 10 classes
    # ['0', '1', '2', '3', '4']...", the same on both sides
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = (out / "last.pt").read_bytes()
    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    for split in ("train", "val"):
        (renamed / split / "c").rename(renamed / split / "c2")
    code, _, err = run_cli(capsys, train_argv(renamed, out, "--resume", epochs=2))
    assert code == 2 and "Traceback" not in err
    assert "only in the checkpoint: ['c']" in err and "only in --data: ['c2']" in err, err
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.parametrize("split", ["train", "val"])
def test_data_pointing_at_a_split_says_to_pass_its_parent(capsys, tmp_path, data, split):
    code, _, err = run_cli(capsys, train_argv(data / split, tmp_path / "run"))
    assert code == 2 and "Traceback" not in err
    assert f"is the {split}/ split" in err and f"--data {data}" in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("extra, option", [
    (["--sched", "cosine", "--min-lr", "0.5"], "--min-lr 0.5"),          # the cosine rose 0.00625 -> 0.5
    (["--warmup-epochs", "1", "--warmup-lr", "0.5"], "--warmup-lr 0.5"),  # "warmup" fell from 0.5
])
def test_schedule_floor_or_start_above_the_lr_is_refused(capsys, tmp_path, data, extra, option):
    # batch 4: lr 0.1 x 4 / 256 = 0.0015625, so the schedule would run upwards
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "run", *extra))
    assert code == 2 and "Traceback" not in err
    assert f"{option} is above the learning rate 0.001563" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything is written
    # below it, the same options train
    ok = [v if v != "0.5" else "1e-4" for v in extra]
    assert run_cli(capsys, train_argv(data, tmp_path / "ok", *ok))[0] == 0


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
def test_checkpoint_write_on_a_full_disk_is_an_oserror_enospc(monkeypatch):
    # torch.save(obj, PATH) on a full disk raised RuntimeError("[enforce fail at
    # inline_container.cc] unexpected pos ...") with no errno: a traceback, not a user error
    from sanet.checkpoint import atomic_torch_save
    import sanet.checkpoint as ckpt_mod

    def to_dev_full(path, write):  # every write of the checkpoint meets the kernel's ENOSPC
        write("/dev/full")

    monkeypatch.setattr(ckpt_mod, "atomic_write", to_dev_full)
    with pytest.raises(OSError) as info:
        atomic_torch_save({"w": torch.zeros(100_000)}, "/tmp/never-written.pt")
    assert info.value.errno == errno.ENOSPC and "cannot write /tmp/never-written.pt" in str(info.value)


@needs_dev_full
def test_train_on_a_full_disk_is_a_one_line_error_and_keeps_last_pt(capsys, tmp_path, data, trained_run,
                                                                     monkeypatch):
    import sanet.checkpoint as ckpt_mod

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = (out / "last.pt").read_bytes()
    real = ckpt_mod.atomic_write  # log.csv goes through it too: only the checkpoints meet the full disk
    monkeypatch.setattr(ckpt_mod, "atomic_write",
                        lambda path, write: write("/dev/full") if str(path).endswith(".pt") else real(path, write))
    code, stdout, err = run_cli(capsys, train_argv(data, out, "--resume", "--json", epochs=2))
    assert code == 2 and "Traceback" not in err
    assert "No space left on device" in json.loads(stdout)["error"] and "last.pt" in err, err
    assert (out / "last.pt").read_bytes() == before
