"""Mistakes met walking through README.md and docs/training.md as a new user: the error says
what was wrong and what to pass instead."""
from __future__ import annotations

import json

import pytest

from engine_utils import run_cli, train_argv


def _image(path, fmt):
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format=fmt)
    return path


@pytest.mark.parametrize("fmt,name", [("PNG", "cat.png"), ("JPEG", "cat.jpg"), ("GIF", "cat.gif"),
                                      ("TIFF", "cat.tif"), ("WEBP", "cat.webp")])
def test_image_given_as_weights_is_named_an_image(capsys, tmp_path, fmt, name):
    # `sanet predict --checkpoint cat.jpg last.pt` (arguments swapped) said "a web page or an
    # interrupted download?" of a JPEG
    path = _image(tmp_path / name, fmt)
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", str(path), "--data", str(tmp_path)])
    assert code == 2 and "Traceback" not in err
    assert "not a PyTorch checkpoint" in err and f"a {fmt} image, not weights" in err
    assert "web page" not in err


def test_model_card_given_as_weights_points_at_the_safetensors(capsys, tmp_path):
    # sanet convert writes OUT.json beside OUT.safetensors; passing the card was "a web page?"
    card = tmp_path / "sa_resnet50.json"
    card.write_text(json.dumps({"model": "sa_resnet50", "weights_file": "sa_resnet50.safetensors"}, indent=2))
    image = _image(tmp_path / "cat.png", "PNG")
    code, _, err = run_cli(capsys, ["predict", "--pretrained-file", str(card), str(image)])
    assert code == 2 and "Traceback" not in err
    assert "a JSON file" in err and "OUT.safetensors" in err and "web page" not in err


def test_web_page_still_reads_as_a_web_page(tmp_path):
    import sanet
    from sanet.checkpoint import load_checkpoint_file

    page = tmp_path / "sa_resnet50.pth.tar"
    page.write_bytes(b"<!DOCTYPE html><html>404</html>")
    with pytest.raises(sanet.SanetError, match="a web page or an interrupted download"):
        load_checkpoint_file(page)


@pytest.mark.parametrize("overlay", ["pretrained_cfg_overlay=dict(mean=(0.5, 0.5, 0.5))",
                                     "pretrained_cfg_overlay={mean: (0.5, 0.5, 0.5)}"])
def test_overlay_that_is_no_dict_says_so(capsys, tmp_path, overlay):
    # the README writes pretrained_cfg_overlay=dict(file=...) in Python; on the command line
    # that (or an unquoted key) is read as a string, which was refused as setting "where
    # weights come from (pretrained_cfg_overlay)"
    code, _, err = run_cli(capsys, train_argv(tmp_path / "no-data", tmp_path / "run", "--model-kwargs", overlay))
    assert code == 2 and "Traceback" not in err
    assert "pretrained_cfg_overlay must be a dict literal" in err and "where weights come from" not in err
    assert repr(overlay.partition("=")[2]) in err
    assert not (tmp_path / "run").exists()
