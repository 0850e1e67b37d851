"""SA-ResNet / SA-ResNeXt in timm's registry (SA-NET.md section 2).

Built from timm's own ``ResNet`` (torchvision-style v1.5: stride on the 3x3 conv) with
Shuffle Attention after the last BatchNorm of every block. Variants are data
(the ``SA_MODELS`` table below); ``sa_groups`` and ``sa_impl`` are extra ``create_model`` kwargs.

Choices where the authors are silent:

* ResNet-18/34 (BasicBlock, SA after ``bn2``; not released by the authors): G is the
  largest valid group count not above 64, i.e. 32 in the 64-channel stage and 64 elsewhere,
  so every stage keeps the bottleneck models' G = 64 wherever 64 fits.
* ``zero_init_last`` defaults to False as in the authors' ``ResNet(zero_init_residual=False)``
  (timm's default is True); pass ``zero_init_last=True`` to change it.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Dict, List

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_ntuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models.resnet import ResNet

from ..checkpoint import load_checkpoint_file
from ..errors import SanetError, warn_user
from ..layers import ShuffleAttention
from ..layers.groups import fit_sa_groups, is_positive_int, valid_sa_groups
from ..layers.shuffle_attention import SA_IMPLS
from .blocks import SABasicBlock, SABottleneck
from .checkpoint_filter import CheckpointMismatchError, cfg_from_weights, checkpoint_filter_fn

__all__ = ["SA_MODELS", "AUTHORS_URL", "AUTHORS_WEIGHTS", "weights_help"]

AUTHORS_URL = "https://github.com/wofmanaf/SA-Net"

# Published weights (authors' README: Baidu Drive links with access codes).
AUTHORS_WEIGHTS = {
    "sa_resnet50": "sa_resnet50.pth.tar (top-1 77.88; Baidu Drive "
                   "https://pan.baidu.com/s/1-TEXeMjprUDyx013l3vZIQ, access code 474p)",
    "sa_resnet101": "sa_resnet101.pth.tar (top-1 78.95; Baidu Drive "
                    "https://pan.baidu.com/s/16L0enJxKMd9LJ8B4dbGmtw, access code 6nxm)",
}


def _cfg(**kwargs) -> Dict[str, Any]:
    # Authors' evaluation: Resize(256) + CenterCrop(224), bilinear, ImageNet mean/std.
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc",
        "paper_ids": "arXiv:2102.00240",
        "paper_name": "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks",
        "origin_url": AUTHORS_URL,
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "sa_resnet18": _cfg(),
    "sa_resnet34": _cfg(),
    "sa_resnet50.authors_in1k": _cfg(license="unknown"),
    "sa_resnet101.authors_in1k": _cfg(license="unknown"),
    "sa_resnet152": _cfg(),
    "sa_resnext50_32x4d": _cfg(),
    "sa_resnext101_32x8d": _cfg(),
    "sa_resnet_test": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
})


def weights_help(variant: str) -> str:
    """Where a variant's weights come from and how to load them."""
    if variant in AUTHORS_WEIGHTS:
        return (
            f"{variant}: sanet downloads nothing. The authors' ImageNet weights, "
            f"{AUTHORS_WEIGHTS[variant]}, are published in the README of {AUTHORS_URL}. Load the file "
            f"with timm.create_model('{variant}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='/path/to/{variant}.pth.tar')), "
            f"or convert it once: sanet convert {variant}.pth.tar {variant}.safetensors "
            f"--model {variant}"
        )
    return (
        f"{variant}: no pretrained weights exist (the authors released sa_resnet50 and "
        f"sa_resnet101 only). Train it with `sanet train`, or pass your own file with "
        f"pretrained_cfg_overlay=dict(file=...)."
    )


def _sa_widths(kwargs: Dict[str, Any]) -> List[int]:
    """The channel counts of the model's SA layers, ascending."""
    # SA runs on each stage's block output: channels[i] * expansion (the stem is never attended)
    stage_channels = kwargs.get("channels", inspect.signature(ResNet).parameters["channels"].default)
    # ResNet also takes one block class per stage, as timm does: a tuple
    blocks = to_ntuple(len(stage_channels))(kwargs["block"])
    return sorted({int(c) * getattr(b, "expansion", 1) for c, b in zip(stage_channels, blocks)})


def _check_groups_fit(variant: str, groups: int, kwargs: Dict[str, Any]) -> None:
    """Reject a G that some SA layer can't split its channels into, naming the model's SA widths
    and the G that fit all of them (ShuffleAttention itself could name neither the model nor
    ``sa_groups``, and suggests ``fit_sa_groups``, which ``create_model`` can't apply)."""
    widths = _sa_widths(kwargs)
    bad = [c for c in widths if c % (2 * groups)]
    if not bad:
        return
    valid = sorted(set.intersection(*(set(valid_sa_groups(c)) for c in widths)))
    raise ValueError(
        f"{variant}: sa_groups={groups} does not fit its {', '.join(map(str, bad))}-channel SA layers "
        f"(SA needs channels divisible by 2 * sa_groups; its SA layers have {', '.join(map(str, widths))} "
        f"channels); valid sa_groups: {valid}")


def _warn_groups_unused(variant: str, groups: int, kwargs: Dict[str, Any]) -> None:
    """Models whose layers fit G (BasicBlock ones) use, per layer, the largest valid G not above
    sa_groups; say so when an explicit sa_groups is then used by none of them."""
    widths = _sa_widths(kwargs)
    if all(c % (2 * groups) for c in widths):
        used = ", ".join(str(fit_sa_groups(c, groups)) for c in widths)
        warn_user(f"{variant}: sa_groups={groups} fits none of its SA layers ({', '.join(map(str, widths))} "
                  f"channels); each uses the largest valid G not above it: {used}. Valid G for all of them: "
                  f"{sorted(set.intersection(*(set(valid_sa_groups(c)) for c in widths)))}")


def _create_sa_resnet(variant: str, pretrained: bool = False, *, fit_groups: bool = False,
                      **kwargs) -> ResNet:
    given = set(kwargs)
    groups = kwargs.pop("sa_groups", 64)
    # Checked here so that every model rejects it alike (fitted and plain layers would word
    # it differently, and 2.5 used to build a model with G = 2).
    if not is_positive_int(groups):
        raise ValueError(f"{variant}: sa_groups must be a positive int (the SA group count G, "
                         f"default 64), got {groups!r} of type {type(groups).__name__}")
    impl = kwargs.pop("sa_impl", "auto")
    if impl not in SA_IMPLS:  # (ShuffleAttention's own error names neither the model nor sa_impl)
        raise ValueError(f"{variant}: sa_impl must be one of {SA_IMPLS}, got {impl!r}")
    block_args = dict(kwargs.pop("block_args", None) or {})
    if "attn_layer" in block_args:  # overwriting it would build SA silently
        raise ValueError(
            f"{variant}: block_args attn_layer={block_args['attn_layer']!r} is not accepted: sa_* models fix "
            f"the attention layer to ShuffleAttention (its options are sa_groups and sa_impl). For another "
            f"attention, use timm's own ResNet, e.g. timm.create_model('resnet50', "
            f"block_args=dict(attn_layer='se'))")
    if not fit_groups:
        _check_groups_fit(variant, groups, kwargs)
    elif "sa_groups" in given:
        _warn_groups_unused(variant, groups, kwargs)
    block_args["attn_layer"] = partial(ShuffleAttention.fitted if fit_groups else ShuffleAttention,
                                       groups=groups, impl=impl)
    kwargs.setdefault("zero_init_last", False)
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
            raise SanetError(weights_help(variant))
        if not (cfg.file or cfg.state_dict):
            # timm would download it, and load it without the file-derived defaults below
            # (a 10-class file into a 1000-class model): sanet reads local files only.
            where = f"url={cfg.url!r}" if cfg.url else f"hf_hub_id={cfg.hf_hub_id!r}"
            raise SanetError(f"{variant}: pretrained_cfg_overlay {where}: sanet loads SA weights from local "
                             "files only (nothing is downloaded at run time). Download the file yourself, then "
                             f"pass pretrained_cfg_overlay=dict(file='/path/to/file')")
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
        state_dict = cfg.state_dict
        if cfg.file and not state_dict:
            # Read the file ourselves (weights_only / safetensors) and hand timm the tensors:
            # timm before 1.0.26 opened pretrained files with torch.load(weights_only=False).
            state_dict = overlay["state_dict"] = load_checkpoint_file(cfg.file)
            if not isinstance(state_dict, dict):
                raise CheckpointMismatchError(f"{cfg.file}: expected a checkpoint dict or state_dict, "
                                              f"found {type(state_dict).__name__}")
        if state_dict:  # the weights, not the registry, set the default head and input channels
            overlay = {**cfg_from_weights(state_dict, cfg.classifier, cfg.first_conv, cfg.input_size,
                                          cfg.mean, cfg.std), **overlay}
        kwargs["pretrained_cfg_overlay"] = overlay
    model = build_model_with_cfg(
        ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        block_args=block_args, **kwargs)
    # timm keeps the overlay in model.pretrained_cfg: a state_dict there would keep a second
    # copy of the weights alive as long as the model.
    for cfg in (model.pretrained_cfg, getattr(model, "default_cfg", None)):
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model


def _bottleneck(layers, **extra) -> Dict[str, Any]:
    return dict(block=SABottleneck, layers=layers, **extra)


def _basic(layers) -> Dict[str, Any]:
    return dict(block=SABasicBlock, layers=layers, fit_groups=True)


#: Architecture of every registered SA model (used by ``sanet models`` and the tests).
SA_MODELS: Dict[str, Dict[str, Any]] = {
    "sa_resnet18": _basic((2, 2, 2, 2)),
    "sa_resnet34": _basic((3, 4, 6, 3)),
    "sa_resnet50": _bottleneck((3, 4, 6, 3)),
    "sa_resnet101": _bottleneck((3, 4, 23, 3)),
    "sa_resnet152": _bottleneck((3, 8, 36, 3)),
    "sa_resnext50_32x4d": _bottleneck((3, 4, 6, 3), cardinality=32, base_width=4),
    "sa_resnext101_32x8d": _bottleneck((3, 4, 23, 3), cardinality=32, base_width=8),
    # Tiny model for tests and demos: timm's plain 64-channel stem, then 4 single-block
    # stages of 32-256 channels, G fitted <= 64. (timm ignores stem_width for this stem.)
    "sa_resnet_test": _bottleneck((1, 1, 1, 1), channels=(8, 16, 32, 64), fit_groups=True),
}


def _build(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> ResNet:
    return _create_sa_resnet(name, pretrained, **dict(SA_MODELS[name], **kwargs))


@register_model
def sa_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """SA-ResNet-18 (BasicBlock; SA after bn2, G = 32/64/64/64)."""
    return _build("sa_resnet18", pretrained, kwargs)


@register_model
def sa_resnet34(pretrained: bool = False, **kwargs) -> ResNet:
    """SA-ResNet-34 (BasicBlock; SA after bn2, G = 32/64/64/64)."""
    return _build("sa_resnet34", pretrained, kwargs)


@register_model
def sa_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """SA-ResNet-50 (Zhang & Yang 2021), 25,557,740 parameters."""
    return _build("sa_resnet50", pretrained, kwargs)


@register_model
def sa_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """SA-ResNet-101 (Zhang & Yang 2021), 44,550,684 parameters."""
    return _build("sa_resnet101", pretrained, kwargs)


@register_model
def sa_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """SA-ResNet-152, 60,195,052 parameters (no released weights)."""
    return _build("sa_resnet152", pretrained, kwargs)


@register_model
def sa_resnext50_32x4d(pretrained: bool = False, **kwargs) -> ResNet:
    """SA-ResNeXt-50 32x4d (no released weights)."""
    return _build("sa_resnext50_32x4d", pretrained, kwargs)


@register_model
def sa_resnext101_32x8d(pretrained: bool = False, **kwargs) -> ResNet:
    """SA-ResNeXt-101 32x8d (no released weights)."""
    return _build("sa_resnext101_32x8d", pretrained, kwargs)


@register_model
def sa_resnet_test(pretrained: bool = False, **kwargs) -> ResNet:
    """Tiny SA-ResNet for tests and demos (one bottleneck per stage)."""
    return _build("sa_resnet_test", pretrained, kwargs)
