"""``sanet eval``: metrics agree with training's validation, JSON keys, class matching, errors."""
from __future__ import annotations

import shutil

import pytest

from engine_utils import last_json, load_ckpt, make_imagefolder, run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A 2-epoch run on tiny data: (data folder, run folder)."""
    from sanet.cli import main

    root = tmp_path_factory.mktemp("eval")
    data = make_imagefolder(root / "data")
    assert main(train_argv(data, root / "run", epochs=2)) == 0
    return data, root / "run"


def test_eval_json_matches_training_validation(capsys, trained):
    data, run = trained
    code, out, _ = run_cli(capsys, ["eval", "--checkpoint", str(run / "last.pt"), "--data", str(data / "val"),
                                    "--workers", "0", "--json"])
    assert code == 0
    result = last_json(out)
    assert {"top1", "top5", "loss", "images"} <= result.keys()
    row = load_ckpt(run / "last.pt")["history"][-1]
    assert result["images"] == row["val_images"] == 12
    assert result["top1"] == pytest.approx(row["val_top1"], abs=1e-3)
    assert result["top5"] == pytest.approx(row["val_top5"], abs=1e-3) and result["top5"] == 100.0  # 3 classes
    assert result["loss"] == pytest.approx(row["val_loss"], rel=1e-4)


def test_eval_pretrained_file_and_class_subset(capsys, trained, tmp_path):
    data, run = trained
    # any weights file: the class count must then match the folders
    code, out, _ = run_cli(capsys, ["eval", "--model", "sa_resnet_test", "--pretrained-file", str(run / "last.pt"),
                                    "--img-size", "16", "--data", str(data / "val"), "--workers", "0", "--json"])
    assert code == 0 and last_json(out)["images"] == 12
    # a checkpoint maps folders by class name: a folder with classes b and c only
    sub = tmp_path / "sub"
    for name in ("b", "c"):
        (sub / name).mkdir(parents=True)
        for img in (data / "val" / name).iterdir():
            (sub / name / img.name).write_bytes(img.read_bytes())
    code, out, _ = run_cli(capsys, ["eval", "--checkpoint", str(run / "last.pt"), "--data", str(sub),
                                    "--workers", "0", "--json"])
    assert code == 0 and last_json(out)["images"] == 8


def test_eval_text_output(capsys, trained):
    data, run = trained
    code, out, _ = run_cli(capsys, ["eval", "--checkpoint", str(run / "best.pt"), "--data", str(data / "val"),
                                    "--workers", "0", "--no-progress"])
    assert code == 0 and "top-1" in out and "12 images" in out


def test_eval_errors(capsys, trained, tmp_path):
    import torch

    data, run = trained
    bare = tmp_path / "weights.pt"  # a plain state_dict: no record of its architecture
    torch.save(load_ckpt(run / "last.pt")["model"], bare)
    splits = tmp_path / "splits"  # train/ and val/ beside a third split: still not one split
    shutil.copytree(data, splits)
    shutil.copytree(data / "val", splits / "test")
    cases = {
        "checkpoint of sa_resnet_test, not sa_resnet18": ["--model", "sa_resnet18", "--checkpoint", str(run / "last.pt"),
                                                          "--data", str(data / "val")],
        "evaluation folder not found": ["--checkpoint", str(run / "last.pt"), "--data", str(tmp_path / "nope")],
        "checkpoint not found": ["--checkpoint", str(tmp_path / "x.pt"), "--data", str(data / "val")],
        "does not match sa_resnet18": ["--model", "sa_resnet18", "--pretrained-file", str(bare),
                                       "--data", str(data / "val")],
        "checkpoint of sa_resnet_test, not sa_resnet34": ["--model", "sa_resnet34", "--pretrained-file",
                                                          str(run / "last.pt"), "--data", str(data / "val")],
        "not classes of this model": ["--checkpoint", str(run / "last.pt"),
                                      "--data", str(make_imagefolder(tmp_path / "o", classes=("x",)) / "val")],
        "no EMA weights": ["--checkpoint", str(run / "last.pt"), "--ema", "--data", str(data / "val")],
        f"evaluate one split of it, e.g. --data {data / 'val'}": ["--checkpoint", str(run / "last.pt"),
                                                                   "--data", str(data)],
        f"evaluate one split of it, e.g. --data {splits / 'val'}": ["--checkpoint", str(run / "last.pt"),
                                                                     "--data", str(splits)],
        "--crop-pct must be positive (above 1 pads), got 0.0": ["--checkpoint", str(run / "last.pt"), "--crop-pct", "0",
                                                 "--data", str(data / "val")],
        "--img-size must be at least 8 pixels, got 0": ["--checkpoint", str(run / "last.pt"), "--img-size", "0",
                                                        "--data", str(data / "val")],
        # a crop_pct of 1e-4 resized to 320,000-pixel sides: killed for memory, no message
        "resizes images to 320000 pixels before the 32-pixel center crop: use a crop_pct of at least 0.25": [
            "--checkpoint", str(run / "last.pt"), "--crop-pct", "0.0001", "--img-size", "32", "--data", str(data / "val")],
        "image size 5000 (--img-size, else the training run's or the model's) is above the 4096 pixels": [
            "--checkpoint", str(run / "last.pt"), "--img-size", "5000", "--data", str(data / "val")],
    }
    for message, argv in cases.items():
        code, _, err = run_cli(capsys, ["eval", "--workers", "0", *argv])
        assert code == 2 and message in err, (message, err)


def test_eval_unreadable_image(capsys, trained, tmp_path):
    data, run = trained
    folder = make_imagefolder(tmp_path / "d")
    bad = folder / "val" / "a" / "zz.png"
    bad.write_bytes(b"garbage")
    argv = ["eval", "--checkpoint", str(run / "last.pt"), "--data", str(folder / "val"), "--workers", "0", "--json"]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and f"cannot read image {bad}" in err
    code, out, _ = run_cli(capsys, argv + ["--skip-bad-images"])
    assert code == 0 and last_json(out)["images"] == 12 and last_json(out)["skipped"] == 1


def test_eval_with_no_readable_image_is_an_error(capsys, trained, tmp_path):
    _, run = trained
    for name in ("a", "b", "c"):
        (tmp_path / "junk" / name).mkdir(parents=True)
        (tmp_path / "junk" / name / "x.png").write_bytes(b"not an image")
    code, out, err = run_cli(capsys, ["eval", "--checkpoint", str(run / "last.pt"), "--data", str(tmp_path / "junk"),
                                      "--workers", "0", "--skip-bad-images", "--json"])
    assert code == 2 and "nothing was evaluated" in err and "3 skipped" in last_json(out)["error"]


def test_weights_of_another_group_count_convert_and_evaluate(capsys, trained, tmp_path):
    """A run trained with --model-kwargs sa_groups=8: the group count is read off the SA
    weights by convert and by --pretrained-file, and a sanet convert file names its model."""
    data, _ = trained
    run = tmp_path / "g8"
    assert run_cli(capsys, train_argv(data, run, "--model-kwargs", "sa_groups=8"))[0] == 0
    expected = last_json(run_cli(capsys, ["eval", "--checkpoint", str(run / "last.pt"), "--data",
                                          str(data / "val"), "--workers", "0", "--json"])[1])
    # a train checkpoint given as --pretrained-file is read as one (classes, image size, groups)
    code, out, err = run_cli(capsys, ["eval", "--pretrained-file", str(run / "last.pt"), "--data",
                                      str(data / "val"), "--workers", "0", "--json"])
    assert code == 0, err
    assert last_json(out)["top1"] == expected["top1"] and last_json(out)["loss"] == expected["loss"]
    st = tmp_path / "g8.safetensors"
    code, out, err = run_cli(capsys, ["convert", str(run / "last.pt"), str(st), "--model", "sa_resnet_test", "--json"])
    assert code == 0, err
    assert last_json(out)["sa_groups"] == 8
    code, out, err = run_cli(capsys, ["eval", "--pretrained-file", str(st), "--img-size", "16", "--data",
                                      str(data / "val"), "--workers", "0", "--json"])  # no --model
    assert code == 0, err
    assert last_json(out)["model"] == "sa_resnet_test"
    assert last_json(out)["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_converted_run_is_evaluated_at_its_training_size(capsys, trained, tmp_path):
    """A converted run checkpoint brings its image size (16, not the model's default 64)
    and class names: eval of the .safetensors file equals eval of the checkpoint."""
    data, run = trained
    st = tmp_path / "run.safetensors"
    assert run_cli(capsys, ["convert", str(run / "last.pt"), str(st), "--model", "sa_resnet_test"])[0] == 0
    argv = ["--data", str(data / "val"), "--workers", "0", "--json"]
    expected = last_json(run_cli(capsys, ["eval", "--checkpoint", str(run / "last.pt"), *argv])[1])
    code, out, err = run_cli(capsys, ["eval", "--pretrained-file", str(st), *argv])
    assert code == 0, err
    assert last_json(out)["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert last_json(out)["top1"] == expected["top1"]


def test_run_fine_tuned_from_another_group_count_evaluates_and_resumes(capsys, trained, tmp_path):
    """Fine-tuning from a sa_groups=2 run builds G = 2 (read off the weights); the new run
    stores it in its args, so eval and --resume rebuild that model. Runs saved before it was
    stored are read the same way (their G read off the weights)."""
    import torch

    data, _ = trained
    argv = ["--data", str(data / "val"), "--workers", "0", "--json"]
    g2, ft = tmp_path / "g2", tmp_path / "ft"
    assert run_cli(capsys, train_argv(data, g2, "--model-kwargs", "sa_groups=2"))[0] == 0
    code, _, err = run_cli(capsys, train_argv(data, ft, "--pretrained-file", str(g2 / "last.pt")))
    assert code == 0, err
    ckpt = load_ckpt(ft / "last.pt")
    assert ckpt["args"]["model_kwargs"] == {"sa_groups": 2}
    assert ckpt["model"]["layer4.0.sa.cweight"].numel() == 256 // (2 * 2)
    code, out, err = run_cli(capsys, ["eval", "--checkpoint", str(ft / "last.pt"), *argv])
    assert code == 0, err
    assert last_json(out)["loss"] == pytest.approx(ckpt["history"][-1]["val_loss"], rel=1e-4)
    code, _, err = run_cli(capsys, train_argv(data, ft, "--resume", epochs=2))  # without --pretrained-file
    assert code == 0, err
    assert load_ckpt(ft / "last.pt")["epoch"] == 2
    # a checkpoint whose args lack the G (as saved before it was stored)
    old = load_ckpt(ft / "last.pt")
    old["args"]["model_kwargs"] = {}
    old_run = tmp_path / "old"
    old_run.mkdir()
    torch.save(old, old_run / "last.pt")
    code, out, err = run_cli(capsys, ["eval", "--checkpoint", str(old_run / "last.pt"), *argv])
    assert code == 0, err
    assert last_json(out)["loss"] == pytest.approx(old["history"][-1]["val_loss"], rel=1e-4)
    code, _, err = run_cli(capsys, train_argv(data, old_run, "--resume", epochs=3))
    assert code == 0, err
    assert "model_kwargs" not in err, err  # read off the weights: not reported as a changed option
    assert load_ckpt(old_run / "last.pt")["args"]["model_kwargs"] == {"sa_groups": 2}


def test_convert_ema_weights_evaluate_as_eval_ema(capsys, trained, tmp_path):
    """An EMA run: convert --ema writes the EMA weights, whose eval equals `eval --ema` of the
    checkpoint; without --ema the model weights (and a note on stderr); --ema elsewhere errors."""
    data, _ = trained
    run = tmp_path / "ema"
    assert run_cli(capsys, train_argv(data, run, "--model-ema", "--model-ema-warmup"))[0] == 0
    ckpt = load_ckpt(run / "last.pt")
    val = ["--data", str(data / "val"), "--workers", "0", "--json"]
    results = {}
    for ema in (True, False):
        st = tmp_path / f"w{ema}.safetensors"
        code, out, err = run_cli(capsys, ["convert", str(run / "last.pt"), str(st), "--model", "sa_resnet_test",
                                          "--json", *(["--ema"] if ema else [])])
        assert code == 0, err
        assert last_json(out)["weights"] == ("ema" if ema else "model")
        assert ("--ema converts the EMA's" in err) is not ema
        from safetensors.torch import load_file

        weights = load_file(str(st))
        source = ckpt["model_ema" if ema else "model"]
        assert all(weights[k].equal(v) for k, v in source.items())
        results[ema] = last_json(run_cli(capsys, ["eval", "--pretrained-file", str(st), *val])[1])
        code, out, err = run_cli(capsys, ["eval", "--checkpoint", str(run / "last.pt"), *val,
                                          *(["--ema"] if ema else [])])
        expected = last_json(out)
        assert results[ema]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        # which weights were evaluated: in the JSON, and a note when the EMA's were left out
        assert expected["ema"] is ema and results[ema]["ema"] is ema  # the file says whose it holds
        assert ("also holds EMA weights ('model_ema'); these are the model's weights; --ema uses" in err) is not ema
    assert results[True]["loss"] != results[False]["loss"]
    code, _, err = run_cli(capsys, ["convert", str(trained[1] / "last.pt"), str(tmp_path / "x.safetensors"),
                                    "--model", "sa_resnet_test", "--ema"])
    assert code == 2 and "holds no EMA weights" in err


def test_progress_bars_only_on_a_terminal(capsys, trained, monkeypatch):
    """`sanet eval ... 2>log` wrote a bar line per redraw into the log (the error line then
    ran on after the last one)."""
    import sys

    data, run = trained
    argv = ["eval", "--checkpoint", str(run / "last.pt"), "--data", str(data / "val"), "--workers", "0"]
    code, _, err = run_cli(capsys, argv)  # pytest's captured stderr is not a terminal
    assert code == 0 and "eval:" not in err and "it/s" not in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = run_cli(capsys, argv)
    assert code == 0 and "eval:" in err  # the bar, where one would see it redraw
