"""`sanet info` and `sanet models` as text: each line's facts, read from the model."""
from __future__ import annotations

import json

import timm

import sanet
from sanet.cli import main


def run_cli(capsys, *argv: str):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _line(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(label))


def test_info_text_lists_the_input_settings_and_feature_maps(capsys):
    code, out, err = run_cli(capsys, "info", "sa_resnet50")
    assert code == 0, err
    assert _line(out, "input:").split(None, 1)[1] == \
        "3x224x224, bilinear, crop_pct 0.875, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]"
    assert _line(out, "features:").split(None, 1)[1] == \
        "act1: 64ch /2, layer1: 256ch /4, layer2: 512ch /8, layer3: 1024ch /16, layer4: 2048ch /32"
    assert _line(out, "MACs / FLOPs:").endswith(" G at 3x224x224")
    info = json.loads(run_cli(capsys, "info", "sa_resnet50", "--json")[1])
    estimate = f"~{info['sa_elementwise_flops_estimate'] / 1e6:.1f} MFLOPs"
    assert estimate in _line(out, "SA element-wise:")


def test_info_text_of_a_model_without_sa_has_no_sa_estimate(capsys):
    code, out, err = run_cli(capsys, "info", "resnet18")
    assert code == 0, err
    assert "(SA: 0)" in out and "SA element-wise" not in out
    assert "weights:" not in out  # sanet knows no weights of timm's own models
    assert _line(out, "input:").split(None, 1)[1].startswith("3x224x224, bicubic, crop_pct 0.95")


def test_models_json_names_each_models_blocks_and_depths(capsys):
    rows = {r["model"]: r for r in json.loads(run_cli(capsys, "models", "--json")[1])}
    for name, args in sanet.SA_MODELS.items():
        assert rows[name]["block"] == args["block"].__name__
        assert rows[name]["layers"] == list(args["layers"])
    assert rows["sa_resnet18"]["block"] == "SABasicBlock" and rows["sa_resnet18"]["layers"] == [2, 2, 2, 2]
    assert rows["sa_resnet50"]["block"] == "SABottleneck" and rows["sa_resnet50"]["layers"] == [3, 4, 6, 3]
    assert rows["sa_resnet152"]["layers"] == [3, 8, 36, 3]


def test_models_table_columns(capsys):
    code, out, err = run_cli(capsys, "models")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("sa_")}
    assert set(rows) == set(sanet.SA_MODELS)
    assert rows["sa_resnet50"].split()[:5] == ["sa_resnet50", "25,557,740", "708", "3x224x224", "SABottleneck"]
    assert rows["sa_resnet18"].split()[2:5] == ["96", "3x224x224", "SABasicBlock"]
    assert rows["sa_resnet50"].endswith("yes (see sanet info)")
    assert rows["sa_resnet101"].endswith("yes (see sanet info)")
    assert rows["sa_resnet152"].endswith("  -")
    test_model = timm.create_model("sa_resnet_test", device="meta")
    assert rows["sa_resnet_test"].split()[3] == "x".join(map(str, test_model.pretrained_cfg["input_size"]))
