"""The hint after a checkpoint mismatch says what differs and what to pass, and following it
loads the file; wrapped models' keys (DDP, torch.compile) and headless files load as they are.

Each test provokes one mismatch with ``sanet_test``-sized files, checks the hint's words, and
then does what the hint says (the advice is checked by loading, not by reading it).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from sanet.checkpoint import load_weights
from sanet.cli import main as cli_main
from sanet.models import CheckpointMismatchError, cfg_from_weights, strip_prefix

NAME = "sa_resnet_test"


def load_pretrained(file: Path, **kwargs) -> nn.Module:
    return timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)


def same_weights(model: nn.Module, state_dict: dict, skip: tuple = ()) -> bool:
    """Every tensor of ``model`` equals the file's, except keys starting with ``skip``."""
    own = model.state_dict()
    return all(torch.equal(v, state_dict[k]) for k, v in own.items() if not k.startswith(skip))


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """(state_dict, path) of a 7-class, 3-channel sa_resnet_test."""
    torch.manual_seed(0)
    sd = timm.create_model(NAME, num_classes=7).state_dict()
    path = tmp_path_factory.mktemp("hints") / "seven.pt"
    torch.save(sd, path)
    return sd, path


def mismatch(model: nn.Module, path: Path) -> str:
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(model, path)
    return str(info.value)


def test_other_class_count_names_both_counts_and_both_ways(seven):
    sd, path = seven
    msg = mismatch(timm.create_model(NAME, num_classes=3), path)
    assert "the file's classifier has 7 classes, the model 3" in msg and "num_classes=7" in msg
    assert "or 0 for no classifier" not in msg and "another architecture" not in msg
    assert same_weights(load_weights(timm.create_model(NAME, num_classes=7), path), sd)
    new_head = load_pretrained(path, num_classes=3)  # "start a new 3-class classifier with ..."
    assert new_head.num_classes == 3 and same_weights(new_head, sd, skip=("fc.",))


def test_classifier_into_a_headless_model_is_its_own_case(seven):
    """num_classes=0 via load_weights used to end in 'another architecture?'."""
    sd, path = seven
    msg = mismatch(timm.create_model(NAME, num_classes=0), path)
    assert "unexpected keys (2): fc.weight, fc.bias" in msg
    assert "the file has a classifier of 7 classes, the model none" in msg and "another architecture" not in msg
    assert "num_classes=7" in msg and "pretrained=True, num_classes=0" in msg
    headless = load_pretrained(path, num_classes=0)  # what the hint says: drops the classifier
    assert headless.num_classes == 0 and same_weights(headless, sd)


def test_pooled_width_is_not_mistaken_for_the_class_count(seven):
    """catavgmax doubles the classifier's input width; dim 0 (classes) is the same."""
    sd, path = seven
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(path, global_pool="catavgmax")
    msg = str(info.value)
    assert "fc.weight (7, 256) vs model (7, 512)" in msg
    assert "the file's classifier takes 256 features, the model's 512" in msg and "'catavgmax'" in msg
    assert "the file's classifier has" not in msg and "num_classes=7" not in msg
    assert same_weights(load_pretrained(path, global_pool="avg"), sd)  # the file's pooling
    model = load_pretrained(path, num_classes=0, global_pool="catavgmax")  # or a new classifier
    model.reset_classifier(7, "catavgmax")
    assert model.fc.in_features == 512 and same_weights(model, sd, skip=("fc.",))


def test_input_channels_hint_and_its_advice(seven):
    sd, path = seven
    msg = mismatch(timm.create_model(NAME, num_classes=7, in_chans=1), path)
    assert "conv1.weight (64, 3, 7, 7) vs model (64, 1, 7, 7)" in msg
    assert "takes 3 input channels, the model's 1" in msg and "in_chans=3" in msg and "in_chans=1" in msg
    assert "another architecture" not in msg
    gray = load_pretrained(path, in_chans=1)  # timm converts the conv: sums over the channels
    torch.testing.assert_close(gray.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    assert same_weights(gray, sd, skip=("conv1.",))
    # two differences, two parts
    both = mismatch(timm.create_model(NAME, num_classes=3, in_chans=1), path)
    assert "classifier has 7 classes" in both and "takes 3 input channels" in both


@pytest.mark.parametrize("out_indices", [None, (1, 2)], ids=["all", "1,2"])
def test_features_only_model_hint(seven, out_indices):
    sd, path = seven
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    msg = mismatch(timm.create_model(NAME, features_only=True, **kwargs), path)
    assert "unexpected keys" in msg and "missing keys" not in msg
    assert "features_only model" in msg and "features_only=True" in msg
    assert out_indices is not None or "unexpected keys (2): fc.weight, fc.bias" in msg
    assert "another architecture" not in msg
    features = load_pretrained(path, features_only=True, **kwargs)
    assert same_weights(features, sd)


@pytest.mark.parametrize("wrap", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_compiled_and_ddp_state_dicts_load(seven, tmp_path, wrap):
    """torch.compile's state_dict prefixes every key with "_orig_mod." (DDP of it: "module.")."""
    sd, _ = seven
    compiled = torch.compile(timm.create_model(NAME, num_classes=7))  # nothing is compiled until called
    assert set(compiled.state_dict()) == {f"_orig_mod.{k}" for k in sd}
    path = tmp_path / "wrapped.pt"
    torch.save({f"{wrap}{k}": v for k, v in sd.items()}, path)
    assert same_weights(load_weights(timm.create_model(NAME, num_classes=7), path), sd)
    assert same_weights(load_pretrained(path), sd)


@pytest.mark.parametrize("wrapper", ["compile", "dataparallel", "dataparallel_of_compiled"])
def test_weights_load_into_a_wrapped_model(seven, tmp_path, wrapper):
    """load_weights(wrapped model, file): a plain file, and the file that wrapped model saves."""
    wraps = {"compile": torch.compile, "dataparallel": nn.DataParallel,
             "dataparallel_of_compiled": lambda m: nn.DataParallel(torch.compile(m))}
    sd, path = seven
    model = wraps[wrapper](timm.create_model(NAME, num_classes=7))
    assert load_weights(model, path) is model
    inner = model.module if isinstance(model, nn.DataParallel) else model
    assert same_weights(getattr(inner, "_orig_mod", inner), sd)
    torch.save(model.state_dict(), tmp_path / "own.pt")  # keys with the wrappers' prefixes
    again = wraps[wrapper](timm.create_model(NAME, num_classes=7))
    load_weights(again, tmp_path / "own.pt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_files_without_batchnorm_step_counters_load(seven, tmp_path):
    """Old PyTorch versions and some converters write no num_batches_tracked; nn.BatchNorm
    loads such files, and so do our strict loaders (the counters start at 0)."""
    sd, _ = seven
    path = tmp_path / "no_counters.pt"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    for model in (load_weights(timm.create_model(NAME, num_classes=7), path), load_pretrained(path)):
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()
                   if not k.endswith("num_batches_tracked"))
        assert all(v.item() == 0 for k, v in model.state_dict().items() if k.endswith("num_batches_tracked"))
    del_other = {k: v for k, v in sd.items() if k != "bn1.running_var"}  # other buffers stay required
    torch.save(del_other, path)
    assert "bn1.running_var" in mismatch(timm.create_model(NAME, num_classes=7), path)


def test_strip_prefix_only_where_every_key_has_it():
    t = torch.zeros(1)
    assert strip_prefix({"_orig_mod.a": t, "b": t}) == {"_orig_mod.a": t, "b": t}
    assert list(strip_prefix({"module._orig_mod.a": t, "module._orig_mod.b": t})) == ["a", "b"]
    assert list(strip_prefix({"x.a": t}, "x.")) == ["a"]


def test_headless_file_defaults_to_no_classifier(tmp_path, capsys):
    """cfg_from_weights: a first conv but no classifier -> num_classes=0; an explicit
    num_classes still wins, and sanet convert builds the headless model the file holds."""
    sd = timm.create_model(NAME, num_classes=0).state_dict()
    assert cfg_from_weights(sd)["num_classes"] == 0
    assert cfg_from_weights(timm.create_model(NAME, num_classes=5).state_dict())["num_classes"] == 5
    assert "num_classes" not in cfg_from_weights({"x.weight": torch.zeros(2, 2)})  # no stem: says nothing
    path = tmp_path / "headless.pt"
    torch.save(sd, path)
    assert load_pretrained(path).num_classes == 0 and same_weights(load_pretrained(path), sd)
    assert load_pretrained(path, num_classes=4).num_classes == 4
    out = tmp_path / "headless.safetensors"
    assert cli_main(["convert", str(path), str(out), "--model", NAME, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_classes"] == 0
    assert same_weights(load_weights(timm.create_model(NAME, num_classes=0), out), sd)


def test_plain_timm_model_hints_offer_only_routes_that_load(tmp_path):
    """For a timm model without sanet's loader, the hint names the kwarg that matches the file
    and no create_model(pretrained=True) route (timm's loader compares with the registry's
    defaults and fails on such a file); following the hint loads it."""
    torch.manual_seed(0)
    for file_kwargs, model_kwargs, fix in (({"num_classes": 10}, {}, "num_classes=10"),
                                           ({"in_chans": 1}, {}, "in_chans=1")):
        sd = timm.create_model("resnet10t", **file_kwargs).state_dict()
        path = tmp_path / "plain.pt"
        torch.save(sd, path)
        msg = mismatch(timm.create_model("resnet10t", **model_kwargs), path)
        assert fix in msg and "pretrained=True" not in msg, msg
        model = load_weights(timm.create_model("resnet10t", **file_kwargs), path)
        assert same_weights(model, sd)


def test_convert_reads_the_models_own_classifier_name(tmp_path, capsys):
    """A timm model whose classifier is not `fc` (hrnet: `classifier`) converts whole, and a
    file without its classifier still converts headless."""
    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small", num_classes=5)
    full, headless = tmp_path / "full.pth", tmp_path / "headless.pth"
    torch.save(model.state_dict(), full)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}, headless)
    for path, classes in ((full, 5), (headless, 0)):
        out = tmp_path / f"{path.stem}.safetensors"
        assert cli_main(["convert", str(path), str(out), "--model", "hrnet_w18_small", "--json"]) == 0
        card = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert card["num_classes"] == classes
