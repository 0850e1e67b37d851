"""``sanet train`` refuses what would lose or misreport work: overwrite checks first, resume
options that cannot or did not carry over, bad --model-kwargs, outputs that are files; and
the run does not depend on how it is executed (worker count, a closed stdout)."""
from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

from engine_utils import load_ckpt, make_imagefolder, run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_overwrite_deletes_nothing_when_the_new_command_fails(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out))[0] == 0
    before = (out / "last.pt").read_bytes()
    for bad in (["--batch-size", "1000"], ["--model-kwargs", "bogus=1"], ["--pretrained-file", str(tmp_path / "none.pt")]):
        code, _, err = run_cli(capsys, train_argv(data, out, "--overwrite", *bad))
        assert code == 2, (bad, err)
        assert (out / "last.pt").read_bytes() == before and (out / "best.pt").exists(), bad
    code, _, err = run_cli(capsys, train_argv(tmp_path / "no-such-data", out, "--overwrite"))
    assert code == 2 and (out / "last.pt").read_bytes() == before


def test_output_that_is_a_file_is_refused(capsys, tmp_path, data):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code, _, err = run_cli(capsys, train_argv(data, target))
    assert code == 2 and "is a file" in err and target.read_text() == "keep me"


def test_resume_applies_this_runs_momentum_and_weight_decay(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out))[0] == 0
    code, _, err = run_cli(capsys, train_argv(data, out, "--resume", "--weight-decay", "0.05",
                                              "--momentum", "0.5", epochs=2))
    assert code == 0 and "weight_decay (0.0001 -> 0.05)" in err
    groups = load_ckpt(out / "last.pt")["optimizer"]["param_groups"]
    assert all(g["weight_decay"] == 0.05 and g["momentum"] == 0.5 for g in groups)
    assert load_ckpt(out / "last.pt")["optimizer"]["state"]  # the momentum buffers were kept


@pytest.mark.parametrize("change,flag", [(["--opt", "adamw"], "--opt"), (["--no-wd-norm"], "--no-wd-norm")])
def test_resume_with_another_optimizer_is_refused(capsys, tmp_path, data, change, flag):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out))[0] == 0
    code, _, err = run_cli(capsys, train_argv(data, out, "--resume", *change, epochs=2))
    assert code == 2 and flag in err and "optimizer state" in err


def test_bad_model_kwargs_are_user_errors(capsys, tmp_path, data):
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "a", "--model-kwargs", "bogus=1", "--json"))
    assert code == 2 and "does not accept" in err and "bogus" in err
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "a2", "--model-kwargs", "bogus=1",
                                              "--pretrained-file", str(_weights_file(tmp_path))))
    assert code == 2 and "does not accept" in err  # the group-count probe of the file, too
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "b", "--model-kwargs", "in_chans=1"))
    assert code == 2 and "RGB" in err
    for kwarg, hint in (("num_classes=5", "class folders"), ("drop_path_rate=0.1", "--drop-path"),
                        ("pretrained=True", "--pretrained-file"), ("features_only=True", "classifier"),
                        ("checkpoint_path='x.pth'", "--pretrained-file"), ("pretrained_cfg={}", "--pretrained-file")):
        code, _, err = run_cli(capsys, train_argv(data, tmp_path / "d", "--model-kwargs", kwarg))
        assert code == 2 and f"may not set {kwarg.split('=')[0]}" in err and hint in err, err
        assert not (tmp_path / "d").exists()  # refused before the output is made
    for kwarg in ("norm_layer='bogus'", "act_layer='nope'"):  # timm looks the name up: a KeyError
        code, _, err = run_cli(capsys, train_argv(data, tmp_path / "e", "--model-kwargs", kwarg))
        assert code == 2 and "does not accept it (unknown name" in err, err
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "f", "--model-kwargs", "sa_groups=8", "bogus=1"))
    assert code == 2 and "sa_groups=8 bogus=1: sa_resnet_test does not accept one of them" in err and "bogus" in err
    with pytest.raises(SystemExit) as info:  # a usage error, as argparse reports them
        run_cli(capsys, train_argv(data, tmp_path / "c", "--model-kwargs", "sa_groups", "--json"))
    out, err = capsys.readouterr()
    assert info.value.code == 2 and "is not K=V" in err
    assert json.loads(out)["command"] == "train" and "K=V" in json.loads(out)["error"]


def _weights_file(tmp_path):
    import timm

    path = tmp_path / "w.pt"
    torch.save(timm.create_model("sa_resnet_test", num_classes=3).state_dict(), path)
    return path


def test_empty_class_folder_is_named(capsys, tmp_path):
    data = make_imagefolder(tmp_path / "d")
    (data / "train" / "zz").mkdir()
    (data / "val" / "zz").mkdir()
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r"))
    assert code == 2 and "['zz'] hold no images" in err


def test_results_do_not_depend_on_the_worker_count(capsys, tmp_path, data):
    """Each image is augmented on generators seeded from (seed, epoch, index)."""
    runs = []
    for workers in ("0", "1"):
        out = tmp_path / f"w{workers}"
        common = ("--deterministic", "--workers", workers, "--mixup", "0.2", "--drop-path", "0.1")
        assert run_cli(capsys, [*train_argv(data, out, *common)])[0] == 0
        runs.append(load_ckpt(out / "last.pt")["model"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_closed_console_does_not_stop_training(monkeypatch, tmp_path, data, stream):
    """`sanet train ... | head` (stdout), or with stderr (progress bars) piped into something
    that exited: the run goes on, its epochs are in log.csv."""
    import sys

    from sanet.cli import main

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    monkeypatch.setattr(sys, stream, ClosedPipe())
    argv = train_argv(data, tmp_path / "run", epochs=2)
    argv.remove("--no-progress")  # progress bars write to stderr
    assert main(argv) == 0
    assert load_ckpt(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_large_seeds_and_seeds_per_image(capsys, tmp_path, data):
    """Seeds up to 2**32 - 1 train; each image's augmentation seed is a hash of (seed, epoch,
    index), so no image reuses another's seed from the epoch before."""
    from sanet.engine.data import _sample_seed

    assert run_cli(capsys, train_argv(data, tmp_path / "r", "--seed", str(2**32 - 1)))[0] == 0
    seeds = {_sample_seed(0, epoch, i) for epoch in range(3) for i in range(2_000_010)[::1000]}
    assert len(seeds) == 3 * len(range(2_000_010)[::1000])
    assert _sample_seed(0, 1, 5) != _sample_seed(0, 0, 5 + 1_000_003)
    assert all(0 <= s < 2**63 for s in seeds)


def test_neighbouring_seeds_do_not_share_epoch_orders():
    """The sampler orders epoch k by seed + k: --seed 1 trained on --seed 0's orders shifted
    by one epoch (a seed sweep's runs shared them)."""
    from sanet.engine.data import _train_sampler
    from sanet.engine.distributed import DistContext

    def order(seed: int, epoch: int):
        sampler = _train_sampler(list(range(50)), DistContext(), seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 3) == order(0, 3) and order(0, 3) != order(0, 4)
    assert all(order(1, k) != order(0, k + 1) for k in range(3))


def test_usage_errors_name_the_command_in_json(capsys, monkeypatch):
    from sanet.cli import main

    with pytest.raises(SystemExit):
        main(["convert", "a.pt", "b.safetensors", "--model", "x", "-o", "y", "--json"])
    out, _ = capsys.readouterr()
    assert json.loads(out) == {"error": "unrecognized arguments: -o y", "command": "convert"}
    monkeypatch.setenv("RANK", "1")  # under torchrun: one JSON object per job, from rank 0
    with pytest.raises(SystemExit):
        main(["info", "--json"])
    assert capsys.readouterr().out == ""


def test_fixed_input_size_model_at_another_size_is_refused_before_the_output_is_touched(capsys, tmp_path, data):
    out = tmp_path / "vit"
    argv = ["train", "--model", "vit_tiny_patch16_224", "--data", str(data), "--output", str(out),
            "--img-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress"]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and "--model-kwargs img_size=32" in err, err
    assert not out.exists()
    # what the message says works
    code, _, err = run_cli(capsys, argv + ["--model-kwargs", "img_size=32", "patch_size=8", "depth=1"])
    assert code == 0, err
    assert load_ckpt(out / "last.pt")["args"]["img_size"] == 32


def test_fixed_input_size_model_built_for_another_size_trains_at_that_size(capsys, tmp_path, data):
    """--model-kwargs img_size=N without --img-size: the data follow the model (timm's cfg
    still says 224)."""
    out = tmp_path / "vit16"
    argv = ["train", "--model", "vit_tiny_patch16_224", "--data", str(data), "--output", str(out),
            "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress",
            "--model-kwargs", "img_size=16", "patch_size=8", "depth=1"]
    code, _, err = run_cli(capsys, argv)
    assert code == 0, err
    assert load_ckpt(out / "last.pt")["args"]["img_size"] == 16


def test_resume_with_no_wd_norm_at_another_weight_decay(capsys, tmp_path, data):
    """--no-wd-norm's two parameter groups exist at weight decay 0 too, so a resume that
    changes --weight-decay (to 0 or from it) fits the saved optimizer state."""
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, "--no-wd-norm", "--weight-decay", "0"))[0] == 0
    code, stdout, err = run_cli(capsys, train_argv(data, out, "--no-wd-norm", "--resume", epochs=2))
    assert code == 0, err
    groups = load_ckpt(out / "last.pt")["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.0001]


def test_changing_epochs_of_a_cosine_run_on_resume_warns(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, "--sched", "cosine", epochs=1))[0] == 0
    code, _, err = run_cli(capsys, train_argv(data, out, "--sched", "cosine", "--resume", epochs=3))
    assert code == 0 and "--epochs 1 -> 3: the cosine schedule is now drawn over 3 epochs" in err
    step = tmp_path / "step"  # the step schedule does not depend on --epochs: no warning
    assert run_cli(capsys, train_argv(data, step, epochs=1))[0] == 0
    code, _, err = run_cli(capsys, train_argv(data, step, "--resume", epochs=2))
    assert code == 0 and "schedule is now drawn" not in err
    # step -> cosine: the schedule change (reported as such) is the cause, not --epochs
    code, _, err = run_cli(capsys, train_argv(data, step, "--resume", "--sched", "cosine", epochs=3))
    assert code == 0 and "sched (step -> cosine)" in err and "schedule is now drawn" not in err


def test_curves_are_drawn_every_epoch_and_redrawn_when_missing(capsys, tmp_path, data, monkeypatch):
    import sanet.engine.trainer as trainer

    drawn = []
    real = trainer.plot_curves
    monkeypatch.setattr(trainer, "plot_curves", lambda history, path, **kw: drawn.append(len(history))
                        or real(history, path, **kw))
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out, epochs=2))[0] == 0
    assert drawn == [1, 2]  # a run stopped after epoch 1 keeps epoch 1's curves
    (out / "curves.png").unlink()  # e.g. killed between last.pt and the picture
    code, stdout, _ = run_cli(capsys, train_argv(data, out, "--resume", "--json", epochs=2))
    assert code == 0 and json.loads(stdout)["curves"] == str(out / "curves.png")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and drawn == [1, 2, 2]


def test_hidden_folders_are_not_classes(capsys, tmp_path):
    data = make_imagefolder(tmp_path / "d")
    for split in ("train", "val"):  # e.g. Jupyter's, with an image copy in it
        (data / split / ".ipynb_checkpoints").mkdir()
        shutil.copy(data / split / "a" / "000.png", data / split / ".ipynb_checkpoints" / "000.png")
    code, stdout, err = run_cli(capsys, train_argv(data, tmp_path / "r", "--json"))
    assert code == 0, err
    assert load_ckpt(tmp_path / "r" / "last.pt")["class_names"] == ["a", "b", "c"]


def test_data_that_is_a_file_and_a_damaged_last_pt_say_what_to_do(capsys, tmp_path, data):
    code, _, err = run_cli(capsys, train_argv(tmp_path / "nope.txt", tmp_path / "r0"))
    assert code == 2 and "--data folder not found" in err
    (tmp_path / "f.txt").write_text("x")
    code, _, err = run_cli(capsys, train_argv(tmp_path / "f.txt", tmp_path / "r0"))
    assert code == 2 and "is a file; give the folder that holds train/ and val/" in err
    out = tmp_path / "run"
    assert run_cli(capsys, train_argv(data, out))[0] == 0
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # damaged after it was written
    code, _, err = run_cli(capsys, train_argv(data, out, "--resume", epochs=2))
    assert code == 2 and "damaged" in err and f"--pretrained-file {out / 'best.pt'}" in err and "--overwrite" in err
