"""`sanet convert` on small hand-made checkpoints: what the card and the safetensors metadata
keep of a training run, EMA weights, files converted twice, and the refusals."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import sanet  # noqa: F401  (registers the SA models)
from sanet.checkpoint import safetensors_metadata
from sanet.cli import main

CLASSES = ["cat", "dog", "eel"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _weights(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("sa_resnet_test", num_classes=3, **kwargs).state_dict()


def _run_checkpoint(path, ema=False, model="sa_resnet_test", **args):
    """A `sanet train` checkpoint as train writes it: weights, class names, the run's args."""
    ckpt = {"model": _weights(), "class_names": CLASSES, "epoch": 1,
            "args": {"model": model, "img_size": 32, "crop_pct": 0.9, "interpolation": "bicubic",
                     "model_kwargs": {}, **args}}
    if ema:
        ckpt["model_ema"] = _weights(seed=1)
    torch.save(ckpt, path)
    return ckpt


def test_a_runs_class_names_and_data_settings_are_kept(tmp_path, capsys):
    _run_checkpoint(tmp_path / "last.pt")
    out = tmp_path / "w.safetensors"
    code, stdout, err = run_cli(capsys, "convert", tmp_path / "last.pt", out, "--model", "sa_resnet_test", "--json")
    assert code == 0, err
    card = json.loads(stdout)
    assert card["card_file"] == str(tmp_path / "w.json")
    assert json.loads((tmp_path / "w.json").read_text()) == {k: v for k, v in card.items() if k != "card_file"}
    assert card["class_names"] == CLASSES and card["img_size"] == 32 and card["crop_pct"] == 0.9
    assert card["interpolation"] == "bicubic"
    assert "model_kwargs" not in card  # none given: nothing recorded
    assert card["in_chans"] == 3 and card["num_classes"] == 3 and card["weights"] == "model"
    meta = safetensors_metadata(out)
    assert json.loads(meta["interpolation"]) == "bicubic" and "model_kwargs" not in meta
    assert meta["weights"] == "model"


def test_a_model_dict_without_class_names_is_not_a_run(tmp_path, capsys):
    """Some tools save {'model': state_dict}: plain weights, no run records, no 'weights' entry."""
    torch.save({"model": _weights()}, tmp_path / "other.pth")
    code, stdout, err = run_cli(capsys, "convert", tmp_path / "other.pth", tmp_path / "o.safetensors",
                                "--model", "sa_resnet_test", "--json")
    assert code == 0, err
    card = json.loads(stdout)
    assert "class_names" not in card and "weights" not in card
    assert "weights" not in safetensors_metadata(tmp_path / "o.safetensors")


def test_a_run_of_another_architecture_is_refused_by_name(tmp_path, capsys):
    _run_checkpoint(tmp_path / "last.pt", model="sa_resnet18")  # says sa_resnet18, whatever its keys
    code, _, err = run_cli(capsys, "convert", tmp_path / "last.pt", tmp_path / "w.safetensors", "--model",
                           "sa_resnet_test")
    assert code == 2 and "is a checkpoint of sa_resnet18, not sa_resnet_test" in err


def test_ema_weights_note_then_ema_then_converted_again(tmp_path, capsys):
    ckpt = _run_checkpoint(tmp_path / "last.pt", ema=True)
    code, _, err = run_cli(capsys, "convert", tmp_path / "last.pt", tmp_path / "m.safetensors", "--model",
                           "sa_resnet_test")
    assert code == 0, err
    assert "also holds EMA weights ('model_ema': its run's best.pt is chosen by their top-1)" in err
    assert "--ema converts the EMA's" in err

    from safetensors.torch import load_file

    ema = tmp_path / "ema.safetensors"
    code, _, err = run_cli(capsys, "convert", tmp_path / "last.pt", ema, "--model", "sa_resnet_test", "--ema")
    assert code == 0 and "note" not in err
    assert torch.equal(load_file(ema)["fc.weight"], ckpt["model_ema"]["fc.weight"])
    assert safetensors_metadata(ema)["weights"] == "ema"
    # converted again: still the EMA's weights, with the run's records
    again = tmp_path / "again.safetensors"
    code, stdout, err = run_cli(capsys, "convert", ema, again, "--model", "sa_resnet_test", "--json")
    assert code == 0, err
    card = json.loads(stdout)
    assert card["weights"] == "ema" and card["class_names"] == CLASSES
    assert safetensors_metadata(again)["weights"] == "ema"
    code, _, err = run_cli(capsys, "convert", ema, tmp_path / "x.safetensors", "--model", "sa_resnet_test", "--ema")
    assert code == 2 and "(it was converted with --ema: it holds the EMA's weights already)" in err


def test_a_non_default_group_count_is_recorded(tmp_path, capsys):
    torch.save(_weights(sa_groups=4), tmp_path / "g4.pth")
    code, stdout, err = run_cli(capsys, "convert", tmp_path / "g4.pth", tmp_path / "g4.safetensors",
                                "--model", "sa_resnet_test", "--json")
    assert code == 0, err
    assert json.loads(stdout)["sa_groups"] == 4
    assert safetensors_metadata(tmp_path / "g4.safetensors")["sa_groups"] == "4"


def test_num_classes_is_checked_against_the_file(tmp_path, capsys):
    torch.save(_weights(), tmp_path / "w3.pth")
    code, _, err = run_cli(capsys, "convert", tmp_path / "w3.pth", tmp_path / "w.safetensors", "--model",
                           "sa_resnet_test", "--num-classes", "5")
    assert code == 2 and "the file's classifier has 3 classes, the model 5" in err
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("folder", ["weights", "card"])
def test_an_output_or_card_path_that_is_a_folder_is_refused_first(tmp_path, capsys, folder):
    torch.save(_weights(), tmp_path / "w3.pth")
    out = tmp_path / "o.safetensors"
    (out if folder == "weights" else tmp_path / "o.json").mkdir()
    code, _, err = run_cli(capsys, "convert", tmp_path / "w3.pth", out, "--model", "sa_resnet_test")
    assert code == 2 and "it is a folder" in err
    assert ("(the model card)" in err) is (folder == "card")
    assert (out.is_dir() if folder == "weights" else not out.exists())  # nothing written


def test_a_card_that_would_replace_the_input_is_refused(tmp_path, capsys):
    src = tmp_path / "w.json"  # an odd name for a checkpoint, but the card would overwrite it
    torch.save(_weights(), src)
    before = src.read_bytes()
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "w.safetensors", "--model", "sa_resnet_test")
    assert code == 2 and "the model card) is the input file" in err
    assert src.read_bytes() == before and not (tmp_path / "w.safetensors").exists()
