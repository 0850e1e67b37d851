"""What a run or converted file records reaches eval/predict right: in_chans=3 runs, files
converted with --ema, a 1-channel file to fine-tune, and hidden folders inside class folders."""
from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch

import sanet  # noqa: F401  (registers the SA models: a test run alone, with -k, needs it)

from engine_utils import load_ckpt, make_imagefolder, run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


def _eval_json(capsys, *weights: str, data) -> dict:
    code, out, err = run_cli(capsys, ["eval", *weights, "--data", str(data / "val"), "--workers", "0",
                                      "--no-progress", "--json"])
    assert code == 0, err
    return json.loads(out)


def test_a_run_trained_with_in_chans_3_evaluates_predicts_and_converts(capsys, tmp_path, data, trained_run):
    """--model-kwargs in_chans=3 (the way to fine-tune from a 1-channel file) was saved with the
    run and then refused by eval, predict and the converted file as if the file were hostile."""
    ckpt = load_ckpt(trained_run / "last.pt")
    ckpt["args"]["model_kwargs"] = {"in_chans": 3}
    run = tmp_path / "run.pt"
    torch.save(ckpt, run)
    plain = _eval_json(capsys, "--checkpoint", str(trained_run / "last.pt"), data=data)
    assert _eval_json(capsys, "--checkpoint", str(run), data=data)["top1"] == plain["top1"]
    image = next((data / "val" / "a").glob("*.png"))
    code, _, err = run_cli(capsys, ["predict", "--checkpoint", str(run), str(image), "--json"])
    assert code == 0, err
    converted = tmp_path / "run.safetensors"
    assert run_cli(capsys, ["convert", str(run), str(converted), "--model", "sa_resnet_test"])[0] == 0
    assert _eval_json(capsys, "--pretrained-file", str(converted), data=data)["top1"] == plain["top1"]
    ckpt["args"]["model_kwargs"] = {"in_chans": 1}  # other input than the RGB eval reads: still refused
    torch.save(ckpt, run)
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", str(run), "--data", str(data / "val")])
    assert code == 2 and "model_kwargs set in_chans" in err, err


def test_a_file_converted_with_ema_is_reported_as_the_emas(capsys, tmp_path, data, trained_run):
    from sanet.checkpoint import SANET_MARK, save_safetensors

    weights = load_ckpt(trained_run / "last.pt")["model"]
    for whose, ema in (("ema", True), ("model", False)):
        path = tmp_path / f"{whose}.safetensors"
        save_safetensors(weights, path, metadata={"model": "sa_resnet_test", "weights": whose, SANET_MARK: "0"})
        assert _eval_json(capsys, "--pretrained-file", str(path), data=data)["ema"] is ema
        image = next((data / "val" / "a").glob("*.png"))
        code, out, err = run_cli(capsys, ["predict", "--pretrained-file", str(path), str(image), "--json"])
        assert code == 0 and json.loads(out)["ema"] is ema, err
    assert _eval_json(capsys, "--checkpoint", str(trained_run / "last.pt"), data=data)["ema"] is False


def test_fine_tuning_a_one_channel_file_says_to_convert_its_first_conv(capsys, tmp_path, data):
    gray = timm.create_model("sa_resnet_test", in_chans=1, num_classes=3)
    path = tmp_path / "gray.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in gray.state_dict().items()}}, path)
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r", "--pretrained-file", str(path)))
    assert code == 2 and "first conv takes 1 channels; add --model-kwargs in_chans=3" in err, err
    assert "drop in_chans" not in err  # the user passed none
    out = tmp_path / "r3"
    code, _, err = run_cli(capsys, train_argv(data, out, "--pretrained-file", str(path),
                                              "--model-kwargs", "in_chans=3"))
    assert code == 0, err
    conv = load_ckpt(out / "last.pt")["model"]["conv1.weight"]
    assert conv.shape[1] == 3
    assert _eval_json(capsys, "--checkpoint", str(out / "last.pt"), data=data)["images"] == 12
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r1", "--model-kwargs", "in_chans=1"))
    assert code == 2 and "drop in_chans from --model-kwargs" in err, err


def test_hidden_folders_inside_class_folders_are_not_read(tmp_path):
    from sanet.engine.data import open_image_folder

    root = make_imagefolder(tmp_path / "d", per_class=2)
    val = root / "val"
    before = len(open_image_folder(val, "evaluation").samples)
    for name in ("a", "b"):  # e.g. a NAS's thumbnail cache beside the images
        (val / name / ".thumbnails").mkdir()
        shutil.copy(val / name / "000.png", val / name / ".thumbnails" / "000.png")
    (val / "a" / "sub").mkdir()  # a visible subfolder still counts (ImageFolder's rule)
    shutil.copy(val / "a" / "000.png", val / "a" / "sub" / "x.png")
    assert len(open_image_folder(val, "evaluation").samples) == before + 1
    for image in (val / "c").glob("*.png"):  # a class whose only images are hidden
        shutil.move(image, val / "b" / ".thumbnails" / f"c{image.name}")
    (val / "c" / ".thumbnails").mkdir()
    shutil.copy(val / "a" / "000.png", val / "c" / ".thumbnails" / "000.png")
    with pytest.raises(FileNotFoundError, match=r"\['c'\] hold no images"):
        open_image_folder(val, "evaluation")


def test_fine_tuning_from_a_file_of_another_architecture_names_it(capsys, tmp_path, data, trained_run):
    """As eval and convert do: one line naming the file's model, not 160 mismatched keys."""
    converted = tmp_path / "w.safetensors"
    code, _, err = run_cli(capsys, ["convert", str(trained_run / "last.pt"), str(converted), "--model",
                                    "sa_resnet_test"])
    assert code == 0, err
    for weights in (trained_run / "last.pt", converted):
        code, _, err = run_cli(capsys, ["train", "--model", "sa_resnet18", "--data", str(data),
                                        "--output", str(tmp_path / "r"), "--pretrained-file", str(weights)])
        assert code == 2 and f"{weights} says it holds sa_resnet_test weights; pass --model sa_resnet_test" in err, err


@pytest.mark.parametrize("inside", ["train/run", "val", "val/a/run"])
def test_an_output_inside_the_image_folders_is_refused(capsys, tmp_path, inside):
    """Its curves.png would be read as an image of a class 'run' by the next run or eval."""
    root = make_imagefolder(tmp_path / "d", per_class=2)
    code, _, err = run_cli(capsys, train_argv(root, root / inside))
    assert code == 2 and f"is inside {root / inside.split('/')[0]}" in err, err
    assert not (root / "train" / "run").exists()
    beside = root / "runs" / "r"  # in the data folder, beside train/ and val/: not read
    assert run_cli(capsys, train_argv(root, beside))[0] == 0


def test_fine_tuning_names_the_model_kwargs_the_file_was_trained_with(capsys, tmp_path, data):
    """Fine-tuning builds the model from the command line's --model-kwargs (only the SA group
    count is read off the weights): a run trained with norm_layer=groupnorm1 (the example of
    --model-kwargs' help) failed as 'another architecture or depth' without saying why."""
    run = tmp_path / "gn"
    code, _, err = run_cli(capsys, train_argv(data, run, "--model-kwargs", "norm_layer=groupnorm1", "sa_groups=32"))
    assert code == 0, err
    converted = tmp_path / "gn.safetensors"
    assert run_cli(capsys, ["convert", str(run / "last.pt"), str(converted), "--model", "sa_resnet_test"])[0] == 0
    for source in (run / "last.pt", converted):
        code, _, err = run_cli(capsys, train_argv(data, tmp_path / "ft", "--pretrained-file", str(source)))
        assert code == 2 and "trained with --model-kwargs norm_layer='groupnorm1': " in err, err
        assert "sa_groups" not in err.split("trained with")[1]  # read off the weights: not to repeat
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "ft", "--pretrained-file", str(run / "last.pt"),
                                              "--model-kwargs", "norm_layer=groupnorm1"))
    assert code == 0, err
