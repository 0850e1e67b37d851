"""``sanet predict``: top-k with the checkpoint's class names or ImageNet's, JSON, errors."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from engine_utils import last_json, make_imagefolder, run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    from sanet.cli import main

    root = tmp_path_factory.mktemp("predict")
    data = make_imagefolder(root / "data")
    assert main(train_argv(data, root / "run", "--lr", "0.05", epochs=3)) == 0
    return data, root / "run"


def test_predict_json_uses_checkpoint_class_names(capsys, trained):
    data, run = trained
    images = [data / "val" / "a" / "000.png", data / "val" / "c" / "001.png"]
    code, out, _ = run_cli(capsys, ["predict", "--checkpoint", str(run / "last.pt"), "--topk", "3", "--json",
                                    *map(str, images)])
    assert code == 0
    result = last_json(out)
    assert [p["image"] for p in result["predictions"]] == [str(i) for i in images]
    for pred in result["predictions"]:
        top = pred["top"]
        assert sorted(t["label"] for t in top) == ["a", "b", "c"]
        probs = [t["prob"] for t in top]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert all(t["label"] == ["a", "b", "c"][t["index"]] for t in top)


def test_topk_above_the_class_count_shows_all_classes_and_says_so(capsys, trained):
    data, run = trained
    code, out, err = run_cli(capsys, ["predict", "--checkpoint", str(run / "last.pt"), "--topk", "5", "--json",
                                      str(data / "val" / "a" / "000.png")])
    assert code == 0
    assert sorted(t["label"] for t in last_json(out)["predictions"][0]["top"]) == ["a", "b", "c"]
    assert "--topk 5 is more than the model's 3 classes; showing all 3" in err
    code, _, err = run_cli(capsys, ["predict", "--checkpoint", str(run / "last.pt"), "--topk", "3",
                                    str(data / "val" / "a" / "000.png")])
    assert code == 0 and "--topk" not in err


def test_predict_agrees_with_eval(capsys, trained):
    """Predict's top-1 on every val image reproduces eval's top-1."""
    data, run = trained
    images = sorted((data / "val").rglob("*.png"))
    code, out, _ = run_cli(capsys, ["predict", "--checkpoint", str(run / "last.pt"), "-k", "1", "--json",
                                    *map(str, images)])
    assert code == 0
    hits = sum(p["top"][0]["label"] == img.parent.name for p, img in zip(last_json(out)["predictions"], images))
    code, out, _ = run_cli(capsys, ["eval", "--checkpoint", str(run / "last.pt"), "--data", str(data / "val"),
                                    "--workers", "0", "--json"])
    assert 100.0 * hits / len(images) == pytest.approx(last_json(out)["top1"], abs=1e-3)


def test_weights_without_class_names_label_classes_by_index(capsys, trained, tmp_path):
    """A bare state_dict records no names: each class is ``class <its output index>``."""
    data, run = trained
    bare = tmp_path / "weights.pt"
    torch.save(torch.load(run / "last.pt", weights_only=True)["model"], bare)
    code, out, _ = run_cli(capsys, ["predict", "--model", "sa_resnet_test", "--pretrained-file", str(bare),
                                    "--topk", "3", "--json", str(data / "val" / "b" / "000.png")])
    assert code == 0
    top = last_json(out)["predictions"][0]["top"]
    assert sorted(t["index"] for t in top) == [0, 1, 2]
    assert all(t["label"] == f"class {t['index']}" for t in top)


def test_predict_imagenet_names_for_1000_classes(capsys, tmp_path, trained):
    import timm

    from sanet.checkpoint import save_safetensors
    from sanet.engine.modeling import imagenet_class_names

    data, _ = trained
    weights = tmp_path / "in1k.safetensors"
    save_safetensors(timm.create_model("sa_resnet_test").state_dict(), weights)
    code, out, _ = run_cli(capsys, ["predict", "--model", "sa_resnet_test", "--pretrained-file", str(weights),
                                    "--img-size", "32", str(data / "val" / "b" / "000.png")])
    assert code == 0
    names = set(imagenet_class_names())
    lines = out.strip().splitlines()[1:]
    assert len(lines) == 5 and all(line.split("%", 1)[1].strip() in names for line in lines)
    assert "tench, Tinca tinca" in names
    # the authors' layout names its architecture ('arch'): --model may be left out
    authors = tmp_path / "model_best.pth.tar"
    sd = {f"module.{k}": v for k, v in timm.create_model("sa_resnet_test").state_dict().items()}
    torch.save({"epoch": 90, "arch": "sa_resnet_test", "state_dict": sd, "best_acc1": 1.0, "optimizer": {}}, authors)
    code, out, err = run_cli(capsys, ["predict", "--pretrained-file", str(authors), "--img-size", "32",
                                      "--json", str(data / "val" / "b" / "000.png")])
    assert code == 0, err
    assert json.loads(out)["model"] == "sa_resnet_test"


def test_predict_errors(capsys, trained, tmp_path):
    data, run = trained
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    code, _, err = run_cli(capsys, ["predict", "--checkpoint", str(run / "last.pt"), str(bad)])
    assert code == 2 and f"cannot read image {bad}" in err
    code, _, err = run_cli(capsys, ["predict", "--checkpoint", str(run / "last.pt"), str(tmp_path / "missing.png")])
    assert code == 2 and "image not found" in err
    bare = tmp_path / "bare.pth"  # a state_dict alone names no architecture
    torch.save(torch.load(run / "last.pt", weights_only=True)["model"], bare)
    code, _, err = run_cli(capsys, ["predict", "--pretrained-file", str(bare), str(bad)])
    assert code == 2 and "needs --model" in err


def test_predict_skip_bad_images_reports_them_in_place(capsys, trained, tmp_path):
    """Without the flag the first unreadable file stops the run (naming the flag); with it,
    unreadable files get an "error" entry in their place and the others their top-k."""
    data, run = trained
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    good = [data / "val" / "a" / "000.png", data / "val" / "c" / "001.png"]
    argv = ["predict", "--checkpoint", str(run / "last.pt"), "-b", "2", "--json", str(good[0]), str(bad), str(good[1])]
    code, out, err = run_cli(capsys, argv)
    assert code == 2 and f"cannot read image {bad}" in err and "--skip-bad-images" in err
    code, out, err = run_cli(capsys, argv + ["--skip-bad-images"])
    assert code == 0 and "skipped 1 unreadable image(s) of 3" in err
    result = last_json(out)
    assert result["skipped"] == 1
    assert [p["image"] for p in result["predictions"]] == [str(good[0]), str(bad), str(good[1])]
    assert "top" not in result["predictions"][1] and str(bad) in result["predictions"][1]["error"]
    code, out, _ = run_cli(capsys, ["predict", "--checkpoint", str(run / "last.pt"), "--json", *map(str, good)])
    alone = last_json(out)["predictions"]
    for i, j in ((0, 0), (2, 1)):  # the same predictions as without the bad file between them
        got, want = result["predictions"][i]["top"], alone[j]["top"]
        assert [t["label"] for t in got] == [t["label"] for t in want]
        assert [t["prob"] for t in got] == pytest.approx([t["prob"] for t in want], abs=1e-5)
    code, out, _ = run_cli(capsys, argv[:-4] + [str(bad), str(good[0]), "--skip-bad-images"])
    assert code == 0 and f"{bad}\n  skipped: cannot read image {bad}" in out
    code, _, err = run_cli(capsys, argv[:-4] + [str(bad), str(bad), "--skip-bad-images"])
    assert code == 2 and "none of the 2 images could be read" in err


def test_other_tools_safetensors_metadata_is_not_read(capsys, trained, tmp_path):
    """Metadata that another tool wrote means what it meant there: an "interpolation" that is
    not JSON made predict and convert refuse the file (asking to convert it, which failed
    the same way), a "model" entry made them ask for --model resnet50."""
    import timm

    from sanet.checkpoint import SANET_MARK, safetensors_metadata, save_safetensors

    data, _ = trained
    foreign = tmp_path / "foreign.safetensors"
    save_safetensors(timm.create_model("sa_resnet_test").state_dict(), foreign,
                     metadata={"format": "pt", "interpolation": "bicubic", "model": "resnet50"})
    assert safetensors_metadata(foreign) == {}
    image = str(data / "val" / "a" / "000.png")
    code, out, err = run_cli(capsys, ["predict", "--model", "sa_resnet_test", "--pretrained-file", str(foreign),
                                      "--img-size", "32", "--json", image])
    assert code == 0, err
    converted = tmp_path / "ours.safetensors"
    code, _, err = run_cli(capsys, ["convert", str(foreign), str(converted), "--model", "sa_resnet_test"])
    assert code == 0, err
    meta = safetensors_metadata(converted)
    assert meta["model"] == "sa_resnet_test" and SANET_MARK in meta and "interpolation" not in meta
    code, _, err = run_cli(capsys, ["predict", "--pretrained-file", str(converted), "--img-size", "32", image])
    assert code == 0, err  # ours names its model: --model may be left out


def test_converted_run_keeps_its_class_names_and_image_size(capsys, trained, tmp_path):
    """sanet convert of a run checkpoint keeps class names, img_size and crop_pct in the
    safetensors metadata: predict on the .safetensors file equals predict on the checkpoint
    (the same labels, and probabilities that only the run's 16-pixel transform reproduces)."""
    from safetensors import safe_open

    data, run = trained
    st = tmp_path / "run.safetensors"
    code, out, err = run_cli(capsys, ["convert", str(run / "last.pt"), str(st), "--model", "sa_resnet_test",
                                      "--json"])
    assert code == 0, err
    saved = torch.load(run / "last.pt", weights_only=True)
    card = json.loads((tmp_path / "run.json").read_text())  # the model card says so too
    assert json.loads(out) == dict(card, card_file=str(tmp_path / "run.json"))
    assert card["class_names"] == ["a", "b", "c"] and card["img_size"] == 16
    with safe_open(str(st), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == saved["class_names"] == ["a", "b", "c"]
    assert json.loads(meta["img_size"]) == saved["args"]["img_size"] == 16
    assert json.loads(meta["crop_pct"]) == saved["args"]["crop_pct"]
    images = [str(data / "val" / "a" / "000.png"), str(data / "val" / "c" / "001.png")]
    expected = last_json(run_cli(capsys, ["predict", "--checkpoint", str(run / "last.pt"), "--json", *images])[1])
    code, out, err = run_cli(capsys, ["predict", "--pretrained-file", str(st), "--json", *images])
    assert code == 0, err
    got = last_json(out)
    assert got["model"] == "sa_resnet_test"
    for a, b in zip(got["predictions"], expected["predictions"]):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert [t["prob"] for t in a["top"]] == pytest.approx([t["prob"] for t in b["top"]], abs=1e-6)
    # metadata that contradicts the weights is an error, not wrong labels
    from sanet.checkpoint import SANET_MARK, save_safetensors

    bad = tmp_path / "bad.safetensors"
    save_safetensors(saved["model"], bad, metadata={"model": "sa_resnet_test", "class_names": json.dumps(["x"]),
                                                    SANET_MARK: "0.1.0"})
    code, _, err = run_cli(capsys, ["predict", "--pretrained-file", str(bad), *images])
    assert code == 2 and "names 1 classes, its classifier has 3" in err


def test_a_converted_1000_class_run_keeps_its_own_names(capsys, trained, tmp_path):
    """ImageNet's names are for files that name none: a 1000-class run's own names win."""
    from sanet.checkpoint import SANET_MARK, save_safetensors

    data, _ = trained
    names = [f"part-{i:04d}" for i in range(1000)]
    st = tmp_path / "parts.safetensors"
    save_safetensors(timm.create_model("sa_resnet_test").state_dict(), st,
                     metadata={"model": "sa_resnet_test", "class_names": json.dumps(names), SANET_MARK: "0.1.0"})
    code, out, err = run_cli(capsys, ["predict", "--pretrained-file", str(st), "--json",
                                      str(data / "val" / "a" / "000.png")])
    assert code == 0, err
    top = last_json(out)["predictions"][0]["top"]
    assert top and all(t["label"] in names for t in top)


def test_headless_weights_are_refused_with_what_to_do(capsys, trained, tmp_path):
    data, run = trained
    weights = torch.load(run / "last.pt", weights_only=True)["model"]
    headless = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in weights.items() if not k.startswith("fc.")}, headless)
    image = next((data / "val").rglob("*.png"))
    for argv in (["predict", "--model", "sa_resnet_test", "--pretrained-file", str(headless), str(image)],
                 ["eval", "--model", "sa_resnet_test", "--pretrained-file", str(headless), "--data", str(data / "val")]):
        code, _, err = run_cli(capsys, argv)
        assert code == 2 and "eval and predict need one" in err and "sanet train" in err, err


@pytest.mark.parametrize("entry,value,words", [
    ("model_kwargs", {"pretrained": True}, "which a weights file may not"),
    ("model_kwargs", {"num_classes": 3}, "which a weights file may not"),
    ("model_kwargs", {"bogus": 1}, "do not fit sa_resnet_test"),
    ("model_kwargs", {"pretrained_cfg_overlay": {"url": "http://x"}}, "pretrained_cfg_overlay url"),
    ("model_kwargs", [1], "not a dict"),
    ("img_size", "abc", "not a positive int"),
    ("img_size", -5, "not a positive int"),
    ("crop_pct", "x", "not a positive number"),
    ("interpolation", 5, "not one of"),
])
def test_hostile_or_damaged_run_metadata_is_refused(capsys, trained, tmp_path, entry, value, words):
    """A .safetensors file's run metadata (from sanet convert) is checked before use: nothing in
    it may load other weights (a download) or reach timm/torchvision as a bad value."""
    from sanet.checkpoint import SANET_MARK, save_safetensors

    data, run = trained
    weights = torch.load(run / "last.pt", weights_only=True)["model"]
    path = tmp_path / "w.safetensors"  # marked as sanet's: its metadata is read, and checked
    save_safetensors(weights, path, metadata={"model": "sa_resnet_test", entry: json.dumps(value), SANET_MARK: "0"})
    image = next((data / "val").rglob("*.png"))
    code, _, err = run_cli(capsys, ["predict", "--pretrained-file", str(path), str(image)])
    assert code == 2 and words in err, err
    if "do not fit" not in words:  # the file's own settings, checked: no flag overrides them
        assert "damaged or was not written by sanet" in err and "--img-size" not in err, err
