"""Weight files from beyond the authors' script: timm's train.py checkpoints (argparse args,
EMA weights), a 1-channel file's data config, remote weight sources, and convert's output
checks. (The authors' layout: test_checkpoints.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import sanet
from sanet.checkpoint import load_state_dict_file, safetensors_metadata
from sanet.cli import main as cli_main



def load_pretrained(name: str, file, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)


def _timm_train_checkpoint(path: Path, num_classes: int = 7):
    """A checkpoint as timm's train.py (CheckpointSaver) writes it: args as an argparse.Namespace,
    the EMA's weights under 'state_dict_ema'."""
    import argparse

    torch.manual_seed(0)
    model, ema = (timm.create_model("sa_resnet_test", num_classes=num_classes) for _ in range(2))
    torch.save({"epoch": 3, "arch": "sa_resnet_test", "state_dict": model.state_dict(),
                "args": argparse.Namespace(lr=0.1, model="sa_resnet_test"), "state_dict_ema": ema.state_dict(),
                "version": 2, "metric": 12.5}, path)
    return model, ema


def test_a_timm_train_checkpoint_loads_and_says_which_weights(tmp_path, capsys):
    """timm allow-lists argparse.Namespace for its train.py's 'args'; the model's weights load,
    with a warning that the EMA's are there too (timm's load_checkpoint would take those)."""
    path = tmp_path / "model_best.pth.tar"
    model, ema = _timm_train_checkpoint(path)
    with pytest.warns(UserWarning, match=r"also holds EMA weights \('state_dict_ema'\).*--ema") as warned:
        loaded = load_pretrained("sa_resnet_test", path)
    assert [w.filename for w in warned if "EMA" in str(w.message)] == [__file__]  # not timm's builder
    assert loaded.num_classes == 7
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    out = tmp_path / "ema.safetensors"
    assert cli_main(["convert", str(path), str(out), "--model", "sa_resnet_test", "--ema", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["weights"] == "ema" and card["num_classes"] == 7
    # converted again (no EMA left in it to choose): still the EMA's weights, in both records
    again = tmp_path / "again.safetensors"
    assert cli_main(["convert", str(out), str(again), "--model", "sa_resnet_test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "ema"
    assert safetensors_metadata(again)["weights"] == "ema"
    assert json.loads(again.with_suffix(".json").read_text())["weights"] == "ema"
    converted = load_state_dict_file(out)
    assert all(torch.equal(converted[k], v) for k, v in ema.state_dict().items())
    assert cli_main(["convert", str(path), str(tmp_path / "m.safetensors"), "--model", "sa_resnet_test"]) == 0
    assert "also holds EMA weights ('state_dict_ema'" in capsys.readouterr().err
    assert torch.equal(load_state_dict_file(tmp_path / "m.safetensors")["fc.weight"], model.fc.weight)


def test_eval_and_predict_use_a_timm_checkpoints_ema_with_ema(tmp_path):
    from sanet.engine.modeling import load_for_inference

    path = tmp_path / "last.pth.tar"
    model, ema = _timm_train_checkpoint(path)
    plain = load_for_inference("sa_resnet_test", pretrained_file=path)
    assert not plain.ema and plain.unused_ema == "state_dict_ema"
    assert torch.equal(plain.model.fc.weight, model.fc.weight)
    with_ema = load_for_inference("sa_resnet_test", pretrained_file=path, use_ema=True)
    assert with_ema.ema and with_ema.unused_ema is None and torch.equal(with_ema.model.fc.weight, ema.fc.weight)


def test_fine_tuning_notes_the_ema_weights_on_rank_0_only(tmp_path, capsys, monkeypatch):
    """Under torchrun every process loads the file; the note is printed once per job."""
    from sanet.engine.modeling import create_train_model

    path = tmp_path / "model_best.pth.tar"
    source, _ = _timm_train_checkpoint(path)
    monkeypatch.setenv("RANK", "1")
    create_train_model("sa_resnet_test", 7, pretrained_file=path)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    create_train_model("sa_resnet_test", 7, pretrained_file=path)
    err = capsys.readouterr().err
    assert "also holds EMA weights ('state_dict_ema'); fine-tuning starts from" in err
    # and what happens to the classifier (the file's has 7 classes)
    assert f"fine-tuning from {path}: its classifier of 7 classes is kept" in err, err
    model = create_train_model("sa_resnet_test", 3, pretrained_file=path)
    err = capsys.readouterr().err
    assert "a new classifier for --data's 3 classes replaces its 7-class one" in err, err
    assert model.fc.out_features == 3
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, headless)
    create_train_model("sa_resnet_test", 3, pretrained_file=headless)
    assert "replaces none (the file has no classifier)" in capsys.readouterr().err


@pytest.mark.skipif("test_resnet.r160_in1k" not in timm.list_pretrained("test_resnet*"),
                    reason="timm's tiny test models are not in this timm")
def test_a_pretrained_tag_names_the_architecture_the_file_records(tmp_path, capsys):
    """--model test_resnet.r160_in1k for a file that says test_resnet (a tag is weights of the
    architecture, not another one): accepted by eval/predict's loader and by convert."""
    from sanet.checkpoint import SANET_MARK, save_safetensors
    from sanet.engine.modeling import load_for_inference

    tagged = "test_resnet.r160_in1k"  # timm's smallest model with a pretrained tag
    model = timm.create_model("test_resnet", num_classes=5)
    path = tmp_path / "w.safetensors"
    save_safetensors(model.state_dict(), path, metadata={"model": "test_resnet", SANET_MARK: "0"})
    loaded = load_for_inference(tagged, pretrained_file=path)
    assert loaded.name == tagged and torch.equal(loaded.model.fc.weight, model.fc.weight)
    authors = tmp_path / "a.pth.tar"  # the authors' layout: 'arch' names the architecture
    torch.save({"arch": "test_resnet", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               authors)
    out = tmp_path / "o.safetensors"
    assert cli_main(["convert", str(authors), str(out), "--model", tagged]) == 0, capsys.readouterr().err
    assert torch.equal(load_state_dict_file(out)["fc.weight"], model.fc.weight)
    with pytest.raises(ValueError, match="says it holds test_resnet weights"):  # another architecture: refused
        load_for_inference("resnet18", pretrained_file=path)


def test_a_one_channel_file_gets_one_mean_and_std(tmp_path):
    """timm's transforms need as many mean/std values as input channels (its train.py reads
    grey images for a 1-channel input_size)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    path = tmp_path / "grey.pth"
    torch.save(timm.create_model("sa_resnet_test", in_chans=1, num_classes=7).state_dict(), path)
    cfg = resolve_data_config({}, model=load_pretrained("sa_resnet_test", path))
    assert cfg["input_size"][0] == 1 and len(cfg["mean"]) == len(cfg["std"]) == 1
    rgb = timm.models.get_pretrained_cfg("sa_resnet_test")
    assert cfg["mean"][0] == pytest.approx(sum(rgb.mean) / 3) and cfg["std"][0] == pytest.approx(sum(rgb.std) / 3)
    assert create_transform(**cfg)(Image.new("L", (80, 80))).shape == (1, *cfg["input_size"][1:])
    path3 = tmp_path / "rgb.pth"  # an RGB file keeps the registry's three values
    torch.save(timm.create_model("sa_resnet_test").state_dict(), path3)
    assert tuple(load_pretrained("sa_resnet_test", path3).pretrained_cfg["mean"]) == tuple(rgb.mean)


@pytest.mark.parametrize("source", [dict(url="https://example.com/w.pth"), dict(hf_hub_id="someone/weights")])
def test_pretrained_from_a_url_or_the_hub_is_refused(source):
    """sanet reads weights from local files (nothing is downloaded); timm would also load them
    without the file-derived defaults."""
    with pytest.raises(sanet.SanetError, match="local files only.*pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("sa_resnet_test", pretrained=True, pretrained_cfg_overlay=source)


def test_convert_checks_both_outputs_before_writing(tmp_path, capsys):
    source = tmp_path / "w.pth"
    torch.save(timm.create_model("sa_resnet_test").state_dict(), source)
    out = tmp_path / "w.safetensors"
    (tmp_path / "w.json").mkdir()  # where the model card goes
    assert cli_main(["convert", str(source), str(out), "--model", "sa_resnet_test"]) == 2
    assert "w.json (the model card): it is a folder" in capsys.readouterr().err
    assert not out.exists()  # no half conversion
    assert cli_main(["convert", str(source), str(tmp_path / ".safetensors"), "--model", "sa_resnet_test"]) == 2
    assert "a file name ending in .safetensors (e.g. sa_resnet_test.safetensors)" in capsys.readouterr().err
