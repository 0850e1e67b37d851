"""Mutation-round tests for the model registry, the SA blocks and the group helpers.

Each test here was written against a hand-made mutant of ``sanet/models/sa_resnet.py``,
``sanet/models/blocks.py``, ``sanet/models/__init__.py`` or ``sanet/models/checkpoint_filter.py``
that the rest of the suite let through: it fails on that mutant and passes on the code.
(``sanet/layers/groups.py``'s survivors were equivalent mutants: nothing to add here.) Expected values come from
docs/SA-NET.md, the README, or timm's own ResNet (its configs, its blocks, its loading
order), never from sanet's current output. Models are built on the meta device where only
their structure matters; real forwards use tiny inputs.
"""
from __future__ import annotations

import inspect
import types
import warnings
from typing import List

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

import sanet
import sanet.models
from sanet import SA_MODELS, SABasicBlock, SABottleneck, ShuffleAttention
from sanet.models import AUTHORS_WEIGHTS, CheckpointMismatchError, weights_help

from conftest import randomize_sa_, rel_err

NAMES = list(SA_MODELS)
FITTED = [n for n in NAMES if SA_MODELS[n].get("fit_groups")]
PLAIN = [n for n in NAMES if not SA_MODELS[n].get("fit_groups")]
# Models with a timm namesake (sa_X -> X): sa_resnet_test has none.
NAMESAKES = [n for n in NAMES if timm.is_model(n.replace("sa_", "", 1))]


def sa_widths(name: str) -> List[int]:
    """The distinct channel counts of a built model's SA layers, ascending."""
    model = timm.create_model(name, device="meta")
    return sorted({m.channels for m in model.modules() if isinstance(m, ShuffleAttention)})


def joined(values) -> str:
    return ", ".join(map(str, values))


# --------------------------------------------------------------------------- pretrained_cfg
@pytest.mark.parametrize("name", NAMES)
def test_cfg_layout_is_timms_resnet_and_names_the_paper(name):
    """first_conv / classifier are what timm's own ResNet cfg says (timm adapts the stem and
    drops the head by these names: a first_conv of layer1.0.conv1 is a Conv2d too, but the
    wrong one); the paper and the authors' repository as SA-NET.md cites them."""
    cfg = timm.models.get_pretrained_cfg(name)
    resnet = timm.models.get_pretrained_cfg("resnet50")
    assert (cfg.first_conv, cfg.classifier) == (resnet.first_conv, resnet.classifier) == ("conv1", "fc")
    assert cfg.paper_ids == "arXiv:2102.00240"
    assert cfg.paper_name == "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks"
    assert cfg.origin_url == "https://github.com/wofmanaf/SA-Net"


def test_tiny_models_cfg_is_the_readmes():
    """README: crop_pct 0.875 (1.0 for the 64x64 sa_resnet_test)."""
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("sa_resnet_test", device="meta"))
    assert cfg["input_size"] == (3, 64, 64) and cfg["crop_pct"] == 1.0


@pytest.mark.parametrize("name,top1", [("sa_resnet50", "77.88"), ("sa_resnet101", "78.95")])
def test_weights_help_quotes_the_published_top1(name, top1):
    """SA-NET.md section 3: released sa_resnet50 (top-1 77.88) and sa_resnet101 (78.95)."""
    assert set(AUTHORS_WEIGHTS) == {"sa_resnet50", "sa_resnet101"}
    assert f"top-1 {top1};" in weights_help(name)
    with pytest.raises(sanet.SanetError, match=f"top-1 {top1};"):
        timm.create_model(name, pretrained=True)


# --------------------------------------------------------------------------- sa_groups checks
@pytest.mark.parametrize("name", NAMES)
def test_messages_list_the_sa_widths_ascending(name):
    """G = 3 fits no SA layer of any registered model (all widths are 2^k * 32): the error
    (plain models) or the warning (fitted ones) lists every width, ascending, as read off the
    built model (a set of ints iterates as 256, 512, 2048, 1024)."""
    widths = sa_widths(name)
    if name in PLAIN:
        with pytest.raises(ValueError) as info:
            timm.create_model(name, device="meta", sa_groups=3)
        msg = str(info.value)
        assert msg.startswith(f"{name}: sa_groups=3 does not fit its {joined(widths)}-channel SA layers ")
        assert f"its SA layers have {joined(widths)} channels);" in msg
        return
    with pytest.warns(UserWarning) as record:
        timm.create_model(name, device="meta", sa_groups=3)
    assert len(record) == 1
    assert f"fits none of its SA layers ({joined(widths)} channels)" in str(record[0].message)


def test_one_block_class_per_stage_sets_each_stages_width():
    """timm's ResNet takes one block class per stage: a BasicBlock stage of 64 planes has
    64 SA channels (too few for G = 64), a Bottleneck one 256. The check reads each stage's
    own block, in order."""
    basic_first = (SABasicBlock, SABottleneck, SABottleneck, SABottleneck)
    with pytest.raises(ValueError, match=r"^sa_resnet50: sa_groups=64 does not fit its 64-channel SA layers "
                                         r".*its SA layers have 64, 512, 1024, 2048 channels\)"):
        timm.create_model("sa_resnet50", block=basic_first, device="meta")
    basic_last = (SABottleneck, SABottleneck, SABottleneck, SABasicBlock)  # 256, 512, 1024, 512
    model = timm.create_model("sa_resnet50", block=basic_last, device="meta")
    layers = [m for m in model.modules() if isinstance(m, ShuffleAttention)]
    assert sorted({m.channels for m in layers}) == [256, 512, 1024] and {m.groups for m in layers} == {64}


@pytest.mark.parametrize("name", FITTED)
def test_default_groups_on_narrow_fitted_models_warn_only_when_asked_for(name):
    """With 8-plane stages no SA layer fits G = 64 and each takes a smaller G. The warning is
    about an sa_groups the caller gave; the default G says nothing."""
    narrow = dict(channels=(8, 8, 8, 8), device="meta")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = timm.create_model(name, **narrow)
    assert not [w for w in record if "fits none" in str(w.message)]
    assert all(m.groups < 64 for m in model.modules() if isinstance(m, ShuffleAttention))
    with pytest.warns(UserWarning, match=f"^{name}: sa_groups=64 fits none of its SA layers"):
        timm.create_model(name, sa_groups=64, **narrow)


@pytest.mark.parametrize("name", NAMESAKES)
def test_callers_model_args_override_the_registrys(name):
    """As in timm's own factories (``dict(model_args, **kwargs)``): layers=(1, 1, 1, 1) builds
    one block per stage, with timm's namesake's parameters plus SA's 3C/G per layer."""
    model = timm.create_model(name, layers=(1, 1, 1, 1), device="meta")
    layers = [m for m in model.modules() if isinstance(m, ShuffleAttention)]
    assert len(layers) == 4
    plain = timm.create_model(name.replace("sa_", "", 1), layers=(1, 1, 1, 1), device="meta")
    sa = sum(3 * m.channels // m.groups for m in layers)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + sa


# --------------------------------------------------------------------------- pretrained sources
@pytest.mark.parametrize("key,value", [("url", "https://example.com/w.pth"), ("hf_hub_id", "someone/weights")])
def test_a_remote_source_is_named_in_the_refusal(key, value):
    with pytest.raises(sanet.SanetError, match=f"pretrained_cfg_overlay {key}={value!r}: sanet loads SA weights"):
        timm.create_model("sa_resnet_test", pretrained=True, pretrained_cfg_overlay={key: value})


def test_a_state_dict_wins_over_a_file_as_in_timm(tmp_path):
    """timm's loader takes pretrained_cfg's state_dict before its file; so does sanet, which
    then never opens the file (here: one that does not exist)."""
    src = timm.create_model("sa_resnet_test", num_classes=5)
    model = timm.create_model("sa_resnet_test", pretrained=True, pretrained_cfg_overlay=dict(
        state_dict=src.state_dict(), file=str(tmp_path / "missing.pth")))
    assert model.num_classes == 5 and torch.equal(model.fc.weight, src.fc.weight)


def test_a_checkpoint_file_that_is_not_a_dict_is_named(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointMismatchError, match="expected a checkpoint dict or state_dict, found list"):
        timm.create_model("sa_resnet_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


# --------------------------------------------------------------------------- blocks
BLOCKS = [(SABottleneck, Bottleneck), (SABasicBlock, BasicBlock)]
BLOCK_IDS = ["bottleneck", "basic"]


@pytest.mark.parametrize("sa_block,timm_block", BLOCKS, ids=BLOCK_IDS)
def test_blocks_without_attention_run_as_timms(sa_block, timm_block):
    """block_args attn_layer=None: an SA block without SA is timm's block, forward included
    (the fused tail has no SA to fuse)."""
    kwargs = dict(layers=[1, 1, 1, 1], num_classes=10, block_args=dict(attn_layer=None))
    model, ref = ResNet(block=sa_block, **kwargs).eval(), ResNet(block=timm_block, **kwargs).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("sa_block,timm_block", BLOCKS, ids=BLOCK_IDS)
def test_attn_layer_passed_by_position_is_kept(sa_block, timm_block):
    """Every argument of timm's block up to attn_layer=None given by position: no SA."""
    params = list(inspect.signature(timm_block.__init__).parameters.values())[1:]  # no self
    upto = [p.name for p in params].index("attn_layer")
    args = [64, 64 // sa_block.expansion] + [p.default for p in params[2:upto]] + [None]
    block = sa_block(*args)
    assert block.sa is None and not any(isinstance(m, ShuffleAttention) for m in block.modules())


def create_eval(name: str, **kwargs) -> nn.Module:
    return randomize_sa_(timm.create_model(name, **kwargs)).eval()


def _last_bn(block: nn.Module) -> nn.Module:
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


@pytest.mark.parametrize("name", ["sa_resnet_test", "sa_resnet18"])
def test_a_hook_on_the_last_bn_alone_runs_and_takes_effect(name):
    """A forward hook on the tail's BatchNorm only (no hook on SA or the ReLU) fires once per
    forward, and the output it returns is what SA reads: zeros give relu(shortcut)."""
    model = create_eval(name)
    block = model.layer2[0]
    seen = {}
    block.downsample.register_forward_hook(lambda m, i, o: seen.update(shortcut=o))
    block.register_forward_hook(lambda m, i, o: seen.update(out=o))
    calls = []

    def zero(module: nn.Module, inputs, output):
        calls.append(1)
        return torch.zeros_like(output)

    _last_bn(block).register_forward_hook(zero)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1
    assert torch.equal(seen["out"], torch.relu(seen["shortcut"]))  # SA of zeros is zeros


@pytest.mark.parametrize("name", ["sa_resnet_test", "sa_resnet18"])
def test_a_shortcut_that_broadcasts_runs_as_the_modules_one_by_one(name):
    """A custom downsample whose output broadcasts against the block's (here pooled to 1x1)
    can't go through the fused op, which takes a shortcut of x's shape only: the block adds
    it as PyTorch would, like the unfused ('torch') model."""
    fused, plain = create_eval(name), create_eval(name, sa_impl="torch")
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (fused, plain):
        block = model.layer2[0]
        block.downsample = nn.Sequential(block.downsample, nn.AdaptiveAvgPool2d(1))
    with torch.no_grad():
        out, ref = fused.forward_features(x), plain.forward_features(x)
    assert rel_err(out, ref) <= 1e-5


# --------------------------------------------------------------------------- checkpoint adapter
def test_a_cweight_size_no_group_count_explains_names_none():
    """A C-channel SA layer with G groups has C / (2G) cweight values: 3 values in a 32-channel
    layer fit no G (32 / 6 is not whole), so the file says no sa_groups (a hint of
    32 // 6 = 5 would name a G the layer refuses)."""
    model = timm.create_model("sa_resnet_test", device="meta")
    state = dict(model.state_dict())
    assert model.layer1[0].sa.channels == 32  # 8 planes * 4
    state["layer1.0.sa.cweight"] = torch.zeros(1, 3, 1, 1)
    assert sanet.models.sa_groups_of(state, model) is None


def test_weights_are_taken_from_the_key_timm_takes(tmp_path):
    """A checkpoint with both 'state_dict' and 'model' dicts: timm's load_state_dict takes
    'state_dict' (then 'model'); so does sanet."""
    ckpt = {"state_dict": {"module.w": torch.ones(2)}, "model": {"w": torch.zeros(3)}}
    torch.save(ckpt, tmp_path / "both.pth")
    theirs = timm.models.load_state_dict(str(tmp_path / "both.pth"), use_ema=False)
    ours = sanet.models.weights_of(ckpt)
    assert list(ours) == list(theirs) == ["w"] and torch.equal(ours["w"], theirs["w"])


# --------------------------------------------------------------------------- package exports
def test_models_package_all_is_its_public_names():
    """``from sanet.models import *`` gives every public name the package imports, and only
    names that exist."""
    mod = sanet.models
    public = {n for n, v in vars(mod).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert all(hasattr(mod, n) for n in mod.__all__)
    assert sorted(mod.__all__) == sorted(public)
    assert {"weights_help", "sa_groups_of", "SABasicBlock", "SABottleneck", "SA_MODELS"} <= public
