"""The SA-ResNet family through timm's interface, driven by the registry.

Every test that takes ``name`` runs over ``sanet.SA_MODELS``: a newly registered model is
tested without new code. Inputs are tiny (32x32 or 64x64, batch 2) to keep the file fast.
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.resnet import Bottleneck
from torch import nn

import sanet
from sanet import SA_MODELS, SABasicBlock, SABottleneck, ShuffleAttention

from conftest import randomize_sa_, rel_err

NAMES = list(SA_MODELS)
BIG = {"sa_resnet101", "sa_resnet152", "sa_resnext101_32x8d"}

# SA-NET.md section 2: counts of the authors' code (SA params: 3C/G summed over blocks).
PAPER_COUNTS = {
    "sa_resnet50": (25_557_740, 708),
    "sa_resnet101": (44_550_684, 1_524),
    "sa_resnet152": (60_195_052, 2_244),
}


def create(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **kwargs)


def sa_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, ShuffleAttention)]


def blocks(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (SABottleneck, SABasicBlock))]


# --------------------------------------------------------------------------- registry and config
def test_every_model_is_registered_in_timm_on_import():
    registered = set(timm.list_models("sa_*"))
    assert set(NAMES) <= registered
    expected = {"sa_resnet18", "sa_resnet34", "sa_resnet50", "sa_resnet101", "sa_resnet152",
                "sa_resnext50_32x4d", "sa_resnext101_32x8d", "sa_resnet_test"}
    assert expected <= set(NAMES)
    for name in NAMES:
        assert timm.is_model(name)


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_is_complete(name):
    model = create(name, device="meta")
    cfg = model.pretrained_cfg
    for key in ("input_size", "pool_size", "crop_pct", "interpolation", "mean", "std",
                "first_conv", "classifier", "num_classes"):
        assert cfg.get(key) is not None, f"{name}: pretrained_cfg lacks {key}"
    c, h, w = cfg["input_size"]
    assert c == 3 and cfg["pool_size"] == (-(-h // 32), -(-w // 32)), "pool_size = input_size / 32"
    assert 0 < cfg["crop_pct"] <= 1 and cfg["interpolation"] in ("bilinear", "bicubic")
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["num_classes"] == model.num_classes == 1000
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg["first_conv"]], nn.Conv2d)
    assert isinstance(modules[cfg["classifier"]], nn.Linear)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == cfg["input_size"]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sa_resnet_test"])
def test_default_cfg_is_the_authors_evaluation(name):
    """SA-NET.md section 3: the authors evaluated at Resize(256) + CenterCrop(224), bilinear,
    ImageNet mean/std (torchvision's defaults): their weights score as published only so."""
    cfg = create(name, device="meta").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875  # 224 / 256
    assert cfg["interpolation"] == "bilinear"
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN
    assert tuple(cfg["std"]) == timm.data.IMAGENET_DEFAULT_STD


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", NAMES)
def test_structure_sa_in_every_block_with_the_authors_name(name):
    model = create(name, device="meta")
    bl = blocks(model)
    assert bl and len(sa_layers(model)) == len(bl) == sum(SA_MODELS[name]["layers"])
    for b in bl:
        assert isinstance(b.sa, ShuffleAttention) and not hasattr(b, "se")
        last_bn = b.bn3 if isinstance(b, Bottleneck) else b.bn2
        assert b.sa.channels == last_bn.num_features
        if name in PAPER_COUNTS:
            assert b.sa.groups == 64
        else:
            assert b.sa.groups == sanet.fit_sa_groups(b.sa.channels, 64)
    keys = model.state_dict().keys()
    assert "layer1.0.sa.cweight" in keys and "layer1.0.sa.gn.weight" in keys
    assert not any(".se." in k for k in keys)


def test_basic_block_group_choice():
    model = create("sa_resnet18", device="meta")
    assert [layer[0].sa.groups for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [32, 64, 64, 64]
    assert [layer[0].sa.channels for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [64, 128, 256, 512]


def test_zero_init_last_is_false_like_the_authors():
    model = create("sa_resnet_test")
    for b in blocks(model):
        assert torch.all(b.bn3.weight == 1)
    model = create("sa_resnet_test", zero_init_last=True)
    assert all(torch.all(b.bn3.weight == 0) for b in blocks(model))


@pytest.mark.parametrize("name", ["sa_resnet_test", "sa_resnet18"])
def test_sa_position_after_last_bn_before_residual_add(name):
    """Unfused path (impl 'torch'), watched with hooks: SA reads the last BN's output (bn3 in
    a Bottleneck, bn2 in a BasicBlock) and the block returns relu(sa(bn(.)) + shortcut)."""
    model = randomize_sa_(create(name, sa_impl="torch").eval())
    block = model.layer2[0]
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    seen = {}
    last_bn.register_forward_hook(lambda m, i, o: seen.update(bn3=o))
    block.sa.register_forward_hook(lambda m, i, o: seen.update(sa_in=i[0], sa_out=o))
    block.downsample.register_forward_hook(lambda m, i, o: seen.update(shortcut=o))
    block.register_forward_hook(lambda m, i, o: seen.update(out=o))
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(seen["sa_in"], seen["bn3"])
    torch.testing.assert_close(seen["out"], torch.relu(seen["sa_out"] + seen["shortcut"]))


@pytest.mark.parametrize("name", ["sa_resnet_test", "sa_resnet18"])
def test_hooks_on_the_fused_tail_modules_run(name):
    """With the default (fused) blocks, hooks on bn, sa and the ReLU still fire, and a forward
    pre-hook that changes SA's parameters (how torch.nn.utils.prune works) takes effect: the
    block then runs its modules one by one."""
    model = randomize_sa_(create(name).eval())
    block = model.layer2[0]
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    act = block.act3 if isinstance(block, Bottleneck) else block.act2
    seen = []
    for tag, module in (("bn", last_bn), ("sa", block.sa), ("act", act)):
        module.register_forward_hook(lambda m, i, o, tag=tag: seen.append(tag))
    x = torch.randn(2, 3, 64, 64)
    model(x)
    assert seen == ["bn", "sa", "act"]
    _check_pruning(name, model, x, lambda m: m.layer2[0].sa, "cweight")  # may be 1 value


def _check_pruning(name: str, model, x, owner, param: str) -> None:
    """Prune ``owner(model).param`` away, in ``model`` and in a reference twin: the function
    changes, in the fused model as in the reference, and training reaches ``param_orig``
    (prune's pre-hook recomputes the weight every call; a fused tail that skipped it
    backpropagated through a stale graph)."""
    from torch.nn.utils import prune

    ref = create(name, sa_impl="reference").eval()
    ref.load_state_dict(model.state_dict())
    before = model(x)
    for m in (model, ref):
        prune.l1_unstructured(owner(m), param, amount=1.0)
    after = model(x)
    assert rel_err(after, before) > 1e-4  # pruning changed the function...
    assert rel_err(after, ref(x)) <= 1e-5  # ...in the fused model as in the reference
    model.train()
    for _ in range(2):
        model(x).sum().backward()
    assert getattr(owner(model), f"{param}_orig").grad is not None


@pytest.mark.parametrize("name", ["sa_resnet_test", "sa_resnet18"])
def test_hooks_and_pruning_on_sa_gn_in_fused_blocks(name):
    """has_hooks(sa) sees SA's own hooks, not gn's: a hook on sa.gn must also stop the block
    from fusing (SA then calls gn), and pruning gn.weight must train."""
    model = randomize_sa_(create(name).eval())
    seen = []
    model.layer2[0].sa.gn.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    x = torch.randn(2, 3, 64, 64)
    model(x)
    assert len(seen) == 1
    _check_pruning(name, model, x, lambda m: m.layer2[0].sa.gn, "weight")  # c = 1 here


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("groups", [2.5, "64", 0, True])
def test_bad_sa_groups_rejected_alike(name, groups):
    """sa_resnet18 used to build with G = 2 from 2.5; "64" gave a TypeError in fitted models."""
    with pytest.raises(ValueError, match=(f"^{name}: sa_groups must be a positive int "
                                          r"\(the SA group count G, default 64\), got ")):
        create(name, sa_groups=groups)


@pytest.mark.parametrize("name", NAMES)
def test_sa_groups_that_do_not_fit_name_the_model_and_the_valid_choices(name):
    """G = the narrowest SA layer's C splits it into groups of one channel, half a group too few.
    Plain models reject it naming the model, its SA widths and the G that fit every SA layer
    (read off a built model); fitted ones (BasicBlock, sa_resnet_test) fit it down per layer."""
    widths = sorted({m.channels for m in sa_layers(create(name, device="meta"))})
    groups = widths[0]
    if SA_MODELS[name].get("fit_groups"):
        model = create(name, device="meta", sa_groups=groups)
        assert [m.groups for m in sa_layers(model)] == [
            sanet.fit_sa_groups(m.channels, groups) for m in sa_layers(model)]
        return
    valid = sorted(set.intersection(*(set(sanet.valid_sa_groups(c)) for c in widths)))
    with pytest.raises(ValueError) as info:
        create(name, device="meta", sa_groups=groups)
    msg = str(info.value)
    assert msg.startswith(f"{name}: sa_groups={groups} does not fit its {widths[0]}-channel SA layers")
    assert msg.endswith(f"valid sa_groups: {valid}") and "fit_sa_groups" not in msg
    assert {m.groups for m in sa_layers(create(name, device="meta", sa_groups=valid[-1]))} == {valid[-1]}


@pytest.mark.parametrize("name", [n for n in NAMES if SA_MODELS[n].get("fit_groups")])
def test_fitted_models_say_when_sa_groups_fits_no_layer(name, recwarn):
    """sa_groups=3 can split no even power-of-two width: every layer falls back (to 2), which
    a warning says, with the G that fit all layers; a G that some layer uses stays quiet."""
    model = create(name, device="meta", sa_groups=3)
    widths = [m.channels for m in sa_layers(model)]
    found = [w for w in recwarn if issubclass(w.category, UserWarning)]
    messages = [str(w.message) for w in found]
    assert len(messages) == 1 and messages[0].startswith(f"{name}: sa_groups=3 fits none of its SA layers")
    assert found[0].filename == __file__  # the caller's line, not one inside timm or sanet
    assert f"not above it: {', '.join(str(sanet.fit_sa_groups(c, 3)) for c in sorted(set(widths)))}" in messages[0]
    recwarn.clear()
    create(name, device="meta", sa_groups=32)
    create(name, device="meta")
    assert not [w for w in recwarn if "fits none" in str(w.message)]


def test_bad_sa_impl_names_the_model_and_the_keyword():
    with pytest.raises(ValueError, match=r"^sa_resnet50: sa_impl must be one of \('auto', .*got 'cuda'"):
        create("sa_resnet50", device="meta", sa_impl="cuda")


@pytest.mark.parametrize("attn", [None, "se", "eca"])
def test_another_attention_layer_is_refused_not_replaced(attn):
    """block_args attn_layer used to be overwritten: a model asked for without (or with SE)
    attention was built with SA. The error points at timm's own ResNet, which takes it."""
    with pytest.raises(ValueError, match=(r"^sa_resnet50: block_args attn_layer=.* sa_\* models fix the "
                                          r"attention layer to ShuffleAttention \(its options are sa_groups "
                                          r"and sa_impl\).*timm.create_model\('resnet50'")):
        create("sa_resnet50", device="meta", block_args=dict(attn_layer=attn))
    # the advice works: timm's resnet50 builds with that attention, and no SA
    plain = create("resnet50", device="meta", block_args=dict(attn_layer=attn))
    assert not sa_layers(plain) and (plain.layer1[0].se is None) == (attn is None)


@pytest.mark.parametrize("block", ["SABottleneck", "SABasicBlock"])
def test_sa_blocks_used_directly_in_timms_resnet_build_sa(block):
    """timm's ResNet passes attn_layer only from block_args and its blocks default to none: the
    SA blocks default to ShuffleAttention (fitted to narrow layers), unless told otherwise."""
    from timm.models.resnet import ResNet

    cls = getattr(sanet, block)
    model = ResNet(block=cls, layers=[1, 1, 1, 1], num_classes=10)
    layers = sa_layers(model)
    assert len(layers) == 4 and all(isinstance(m.sa, ShuffleAttention) for m in model.modules() if isinstance(m, cls))
    assert [m.groups for m in layers] == [sanet.fit_sa_groups(m.channels, 64) for m in layers]
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(m.cweight.grad is not None for m in layers)
    assert not sa_layers(ResNet(block=cls, layers=[1, 1, 1, 1], block_args=dict(attn_layer=None)))


def test_numpy_sa_groups_accepted():
    np = pytest.importorskip("numpy")
    model = create("sa_resnet_test", sa_groups=np.int64(4))
    groups = [m.groups for m in sa_layers(model)]
    assert {type(g) for g in groups} == {int} and max(groups) == 4


@pytest.mark.parametrize("name", ["sa_resnet_test", "sa_resnet18"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fused_block_tail_equals_unfused(name, train):
    """The default blocks run bn -> SA -> add -> ReLU as one kernel; same function, same
    gradients and same BatchNorm running statistics as the ops one by one."""
    fused = randomize_sa_(create(name)).train(train)
    plain = create(name, sa_impl="torch").train(train)
    with torch.no_grad():  # non-trivial BN statistics for eval mode
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out_f, out_p = fused(x), plain(x)
    assert rel_err(out_f, out_p) <= 1e-5
    out_f.square().sum().backward()
    out_p.square().sum().backward()
    # Gradients of the small SA tensors are sums with cancellation, deep in the network: the
    # two exact PyTorch formulations ('reference' vs 'torch') already differ by up to ~6e-4
    # there in fp32. So: 2e-3 per parameter tensor, 2e-5 over all gradients together.
    grads_p = dict(plain.named_parameters())
    for k, p in fused.named_parameters():
        assert rel_err(p.grad, grads_p[k].grad) <= 2e-3, k
    all_f = torch.cat([p.grad.flatten() for _, p in fused.named_parameters()])
    all_p = torch.cat([grads_p[k].grad.flatten() for k, _ in fused.named_parameters()])
    assert rel_err(all_f, all_p) <= 2e-5
    state_p = plain.state_dict()
    for k, v in fused.state_dict().items():
        assert rel_err(v.float(), state_p[k].float()) <= 1e-6, k


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", [n for n in NAMES if n != "sa_resnet_test"])
def test_every_model_is_its_timm_namesake_plus_sa(name):
    """sa_X has the parameters of timm's X (depths, widths, cardinality, base width) plus its
    SA layers' 3C/G each: a resnext101_32x8d built as 32x4d would not."""
    model = create(name, device="meta")
    sa = sum(3 * m.channels // m.groups for m in sa_layers(model))
    assert sum(p.numel() for m in sa_layers(model) for p in m.parameters()) == sa
    plain = timm.create_model(name.replace("sa_", ""), device="meta")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + sa
    assert [m.channels for m in sa_layers(model)] == [b.bn2.num_features if isinstance(b, SABasicBlock) else
                                                      b.bn3.num_features for b in blocks(model)]


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_parameter_counts_equal_the_authors(name):
    model = create(name, device="meta")
    total, sa = PAPER_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for m in sa_layers(model) for p in m.parameters()) == sa
    plain = timm.create_model(name.replace("sa_", ""), device="meta")  # timm's own ResNet
    assert sum(p.numel() for p in plain.parameters()) == total - sa


# --------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = create(name, num_classes=10)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    bad = [k for k, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient: {missing[:5]}"
    assert not bad, f"non-finite gradient: {bad[:5]}"
    sa_grads = [p.grad.abs().sum() for m in sa_layers(model) for p in m.parameters()]
    assert sum(g > 0 for g in sa_grads) > len(sa_grads) // 2, "SA parameters receive no signal"
    model.eval()
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2) and y1.shape == (2, 10)


# Shape-only interface checks run on the meta device (no compute); values are checked on
# real tensors by the tests above and below.
@pytest.mark.parametrize("name", NAMES)
def test_features_only_matches_feature_info(name):
    size = 64
    model = create(name, features_only=True, out_indices=(1, 2, 4), device="meta").eval()
    info = model.feature_info
    assert info.reduction() == [4, 8, 32]
    feats = model(torch.randn(2, 3, size, size, device="meta"))
    assert len(feats) == 3
    for f, ch, red in zip(feats, info.channels(), info.reduction()):
        assert f.shape == (2, ch, size // red, size // red)
    full = create(name, device="meta")
    assert info.channels() == [full.feature_info[i]["num_chs"] for i in (1, 2, 4)]
    assert full.feature_info[4]["num_chs"] == full.num_features


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier(name):
    model = create(name, device="meta").eval()
    x = torch.randn(2, 3, 32, 32, device="meta")
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features) and model.num_classes == 0


@pytest.mark.parametrize("name", NAMES)
def test_in_chans_num_classes_drop_path_kwargs(name):
    model = create(name, in_chans=1, num_classes=3, drop_path_rate=0.2, device="meta")
    assert model.conv1.weight.shape[1] == 1
    rates = [b.drop_path.drop_prob for b in blocks(model) if b.drop_path is not None]
    assert rates and max(rates) == pytest.approx(0.2)
    assert model.eval()(torch.randn(2, 1, 32, 32, device="meta")).shape == (2, 3)


@pytest.mark.parametrize("name", ["sa_resnet_test", "sa_resnet18"])
def test_drop_path_is_active_in_training(name):
    model = create(name, drop_path_rate=0.5, num_classes=4).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)


# TorchScript: scripting every model costs about 10 s on 2 cores in total, kept in full.
# 64x64 input: at 32x32 the last stage has 1x1 planes, where the per-channel form loses
# ~|x| * 1e-6 relative precision to cancellation (see test_layer.test_single_pixel_planes),
# which 150 layers amplify beyond 1e-5.
@pytest.mark.parametrize("name", NAMES)
def test_torchscript_equals_eager(name):
    model = randomize_sa_(create(name, num_classes=5)).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(scripted(x), model(x)) <= 1e-5


def test_fx_feature_extraction():
    """timm's fx-based feature extractor traces through the blocks (fused tail disabled)."""
    from timm.models import create_feature_extractor

    model = create("sa_resnet_test").eval()
    fx = create_feature_extractor(model, return_nodes={"layer2": "l2", "layer4": "l4"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = fx(x)
        ref = create("sa_resnet_test", features_only=True, out_indices=(2, 4))
        ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
        l2, l4 = ref.eval()(x)
    assert rel_err(out["l2"], l2) <= 1e-5 and rel_err(out["l4"], l4) <= 1e-5


def test_one_block_class_per_stage_builds_as_timm_allows():
    """timm's ResNet takes `block` as one class per stage too; the sa_groups check reads each."""
    from sanet.models import SABottleneck

    a = timm.create_model("sa_resnet50", block=(SABottleneck,) * 4, device="meta")
    b = timm.create_model("sa_resnet50", device="meta")
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    with pytest.raises(ValueError, match="sa_groups=256 does not fit"):
        timm.create_model("sa_resnet50", block=(SABottleneck,) * 4, sa_groups=256, device="meta")
