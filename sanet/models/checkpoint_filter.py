"""Checkpoint adapters: ``(state_dict, model) -> state_dict`` filters, as timm uses them.

The authors' files (SA-NET.md section 3) are ``{'epoch', 'arch', 'state_dict', 'best_acc1',
'optimizer'}`` dicts whose keys carry DataParallel's ``module.`` prefix; otherwise their names
are ours (torchvision ResNet names plus ``layerI.J.sa.*``). Their loader used
``strict=False``, so a wrong file loaded silently; ours lists every missing, unexpected and
mis-shaped key instead.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import SanetError, warn_user

__all__ = ["CheckpointMismatchError", "checkpoint_filter_fn", "check_state_dict", "strip_prefix", "weights_of",
           "cfg_from_weights", "sa_groups_of", "with_sa_groups_of"]


class CheckpointMismatchError(SanetError):
    """The checkpoint's keys or shapes don't match the model."""


# Key prefixes of wrapped models: DataParallel/DDP (``module.``) and torch.compile
# (``_orig_mod.``), nested in either order (``module._orig_mod.`` for DDP of a compiled model).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefix(state_dict: Dict[str, Tensor],
                 prefix: Union[str, Tuple[str, ...]] = _WRAPPER_PREFIXES) -> Dict[str, Tensor]:
    """Drop key prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``) where every key
    has them, repeatedly, so nested wrappers are undone too."""
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    state_dict = dict(state_dict)
    while state_dict:
        found = next((p for p in prefixes if all(k.startswith(p) for k in state_dict)), None)
        if found is None:
            break
        state_dict = {k[len(found):]: v for k, v in state_dict.items()}
    return state_dict


def _fmt(keys: List[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    state_dict: Dict[str, Tensor],
    model: nn.Module,
    *,
    shape_exempt: Iterable[str] = (),
    missing_ok: Iterable[str] = (),
    source: str = "checkpoint",
) -> Dict[str, Tensor]:
    """Raise :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys;
    return the state_dict to load.

    ``shape_exempt`` names keys whose shape may differ (timm adapts the first conv afterwards
    for another ``in_chans``), ``missing_ok`` keys the model may keep as initialised (a new
    classifier). BatchNorm's ``num_batches_tracked`` may be missing (files of old PyTorch
    versions and some converters lack it; ``nn.BatchNorm`` loads them too): the returned
    state_dict holds it as 0, as a new model's.
    """
    expected = model.state_dict()
    exempt, optional = set(shape_exempt), set(missing_ok)
    counters = [k for k in expected if k not in state_dict and k.rsplit(".", 1)[-1] == "num_batches_tracked"]
    missing = [k for k in expected if k not in state_dict and k not in optional and k not in counters]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched: List[Tuple[str, tuple, tuple]] = [
        (k, tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state_dict and k not in exempt and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        if not counters:
            return state_dict
        return {**state_dict, **{k: torch.zeros((), dtype=expected[k].dtype) for k in counters}}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    lines = [f"{source} does not match {arch}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if mismatched:
        shown = [f"{k} {a} vs model {b}" for k, a, b in mismatched]
        lines.append(f"  shape mismatches ({len(mismatched)}): {_fmt(shown)}")
    lines.append(f"  ({_hint(state_dict, model, missing, unexpected, [k for k, _, _ in mismatched])})")
    raise CheckpointMismatchError("\n".join(lines))


# The SA layer's parameters (SA-NET.md section 1), whose shapes depend on the group count.
_SA_KEYS = (".cweight", ".cbias", ".sweight", ".sbias", ".gn.weight", ".gn.bias")


def _hint(state_dict: Dict[str, Tensor], model: nn.Module, missing: List[str], unexpected: List[str],
          mismatched: List[str]) -> str:
    """What most likely differs, and what to pass: one part per explained difference (classifier,
    first conv, SA group count), or a general question when some difference is unexplained."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture", type(model).__name__)
    via_timm = f"timm.create_model('{arch}', pretrained=True, {{}}, pretrained_cfg_overlay=dict(file=...))"

    def or_load(kwargs: str, effect: str) -> str:
        # Only SA models load files through sanet's filter, which takes the file's class count
        # and input channels as the defaults that timm then adapts; timm's own loader compares
        # with the registry's and would fail on the same file.
        return f", or load it with {via_timm.format(kwargs)}, {effect}" if _sanet_loads(arch) else ""
    if hasattr(model, "feature_info") and not hasattr(model, "num_classes") and unexpected and not (
            missing or mismatched):
        # timm's features_only wrappers keep the layers up to the last of out_indices, no classifier
        return ("this is a features_only model: it has no classifier (nor the layers after its "
                "out_indices), so the file's classifier keys are unexpected; load features_only models "
                f"with {via_timm.format('features_only=True')}")
    absent = sorted({k.split(".")[0] for k in missing} - {k.split(".")[0] for k in state_dict})
    head_module = str(cfg.get("classifier") or "").split(".")[0]
    if (missing and set(absent) - {head_module} and not (unexpected or mismatched)
            and all(k.split(".")[0] in absent for k in missing)):
        # (a missing classifier alone has its own hint, below)
        # whole top-level layers are missing and nothing else differs: a part of this model
        return (f"the file holds no {', '.join(absent)} at all, only part of the model (e.g. the weights of "
                "a features_only model with fewer out_indices); load full weights: a features_only model "
                f"takes the layers it has from them ({via_timm.format('features_only=True')})")
    classifier, first_conv = cfg.get("classifier"), cfg.get("first_conv")
    expected = model.state_dict()
    head = {f"{classifier}.weight", f"{classifier}.bias"} if isinstance(classifier, str) else set()
    parts: List[str] = []
    left_missing, left_unexpected, left_mismatched = set(missing), set(unexpected), set(mismatched)
    file_head, model_head = state_dict.get(f"{classifier}.weight"), expected.get(f"{classifier}.weight")
    if head and left_missing and left_missing <= head:
        parts.append("the file has no classifier: build the model with num_classes=0 "
                     "(sanet convert: --num-classes 0)")
        left_missing.clear()
    if head and left_unexpected and left_unexpected <= head:
        n = int(file_head.shape[0]) if isinstance(file_head, Tensor) and file_head.dim() in (2, 4) else None
        parts.append(f"the file has a classifier{f' of {n} classes' if n else ''}, the model none: build the "
                     f"model with num_classes={n if n else 'N'} (sanet convert: leave --num-classes out)"
                     + or_load("num_classes=0", "which drops the file's classifier"))
        left_unexpected.clear()
    if (head & left_mismatched and isinstance(file_head, Tensor) and isinstance(model_head, Tensor)
            and file_head.dim() == model_head.dim() == 2):
        (nf, df), (nm, dm) = file_head.shape, model_head.shape
        if nf != nm:
            parts.append(f"the file's classifier has {nf} classes, the model {nm}: build the model with "
                         f"num_classes={nf} (sanet convert: --num-classes {nf})"
                         + or_load(f"num_classes={nm}", f"which drops the file's for a new {nm}-class classifier"))
        if df != dm:
            pool = getattr(getattr(model, "global_pool", None), "pool_type", None)
            same_pool = " (global_pool='avg', the default)" if df == getattr(model, "num_features", None) else ""
            parts.append(f"the file's classifier takes {df} features, the model's {dm}"
                         f"{f' (global_pool={pool!r} changes the pooled width)' if pool else ''}: build the "
                         f"model with the file's pooling{same_pool}"
                         + or_load(f"num_classes=0, global_pool={pool!r}" if pool else "num_classes=0",
                                   "which drops the file's classifier, then model.reset_classifier(num_classes"
                                   f"{f', {pool!r}' if pool else ''})"))
        left_mismatched -= head
    conv_key = f"{first_conv}.weight" if isinstance(first_conv, str) else None
    file_conv, model_conv = state_dict.get(conv_key), expected.get(conv_key)
    if (conv_key in left_mismatched and isinstance(file_conv, Tensor) and isinstance(model_conv, Tensor)
            and file_conv.dim() == model_conv.dim() == 4 and file_conv.shape[1] != model_conv.shape[1]
            and file_conv.shape[0] == model_conv.shape[0] and file_conv.shape[2:] == model_conv.shape[2:]):
        a, b = int(file_conv.shape[1]), int(model_conv.shape[1])
        parts.append(f"the file's first conv ({conv_key}) takes {a} input channels, the model's {b}: build the "
                     f"model with in_chans={a}" + or_load(f"in_chans={b}", "which converts the conv"))
        left_mismatched.discard(conv_key)
    if left_mismatched and not (left_missing or left_unexpected) and all(k.endswith(_SA_KEYS) for k in left_mismatched):
        groups = sa_groups_of(state_dict, model)
        if groups is not None:
            parts.append(f"its SA layers were built with another group count: build the model with "
                         f"sa_groups={groups} (--model-kwargs sa_groups={groups})")
            left_mismatched.clear()
    if left_missing or left_unexpected or left_mismatched or not parts:
        return "is this a checkpoint of another architecture or depth?"
    return "; ".join(parts)


def _sanet_loads(arch: str) -> bool:
    """Whether ``timm.create_model(arch, pretrained=True)`` loads files through this module."""
    from .sa_resnet import SA_MODELS  # here: sa_resnet imports this module

    return arch.split(".")[0] in SA_MODELS


def sa_groups_of(state_dict: Dict[str, Tensor], model: nn.Module) -> Optional[int]:
    """The ``sa_groups`` the weights' SA layers were built with, when it differs from the
    model's (None otherwise, or when the file does not say). An SA layer of C channels and G
    groups has C / (2G) values in ``cweight``; narrow layers fit G down (``fit_sa_groups``), so
    the requested G is the largest over the layers."""
    from ..layers import ShuffleAttention

    found, differs = [], False
    for name, module in model.named_modules():
        if isinstance(module, ShuffleAttention):
            w = state_dict.get(f"{name}.cweight")
            if not isinstance(w, Tensor) or w.numel() == 0 or module.channels % (2 * w.numel()):
                return None
            groups = module.channels // (2 * w.numel())
            found.append(groups)
            differs = differs or groups != module.groups
    return max(found) if found and differs else None


#: Where checkpoints keep EMA weights beside the model's: ``sanet train`` (``model_ema``) and
#: timm's ``train.py`` (``state_dict_ema``).
EMA_KEYS = ("model_ema", "state_dict_ema")


def ema_key_of(checkpoint: Any) -> Optional[str]:
    """The key of a checkpoint's EMA weights (``EMA_KEYS``), or None when it holds none."""
    if isinstance(checkpoint, dict):
        for key in EMA_KEYS:
            if isinstance(checkpoint.get(key), dict) and checkpoint[key]:
                return key
    return None


def weights_of(checkpoint: dict) -> Dict[str, Tensor]:
    """The tensors of a checkpoint's weights, without DDP's ``module.`` or torch.compile's
    ``_orig_mod.`` prefix.

    The PyTorch ImageNet example (the authors' script) and timm's ``train.py`` nest them
    under ``state_dict``, ``sanet train`` under ``model``; a bare state_dict is taken as it
    is. EMA weights beside them are not taken (timm's ``load_checkpoint`` prefers them by
    default): :func:`ema_key_of` finds them, ``sanet convert --ema`` extracts them."""
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return strip_prefix({k: v for k, v in checkpoint.items() if isinstance(v, Tensor)})


def cfg_from_weights(checkpoint: dict, classifier: Optional[str] = "fc", first_conv: Optional[str] = "conv1",
                     input_size: Tuple[int, int, int] = (3, 224, 224), mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """``num_classes`` and ``input_size`` (its channel count) as the weights have them; with
    ``mean``/``std`` (the registry's), one value per input channel: the average of the
    registry's where the weights' channel count differs (timm's transforms need as many as
    there are channels: a 1-channel model reads grey images).

    Given to timm as ``pretrained_cfg`` entries, they become ``create_model``'s defaults, so a
    10-class file builds a 10-class model and keeps its classifier, and a file with a first conv
    but no classifier a model without one (``num_classes=0``); an explicit
    ``num_classes``/``in_chans`` still wins (timm then drops the classifier, or starts a new one /
    converts the conv).
    """
    state_dict = weights_of(checkpoint)
    cfg: Dict[str, Any] = {}
    head = state_dict.get(f"{classifier}.weight")
    conv = state_dict.get(f"{first_conv}.weight")
    if isinstance(head, Tensor) and head.dim() in (2, 4):  # Linear, or a 1x1 conv (timm's dla)
        cfg["num_classes"] = int(head.shape[0])
    elif classifier and isinstance(conv, Tensor):
        # a backbone without classifier (a feature extractor's weights): a headless model by default
        cfg["num_classes"] = 0
    if isinstance(conv, Tensor) and conv.dim() == 4:
        chans = int(conv.shape[1])
        cfg["input_size"] = (chans, *input_size[1:])
        for key, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != chans:
                cfg[key] = (sum(values) / len(values),) * chans
    return cfg


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> Dict[str, Tensor]:
    """Authors' layout (or ours) -> this model's state_dict, checked strictly.

    Used by ``timm.create_model(..., pretrained=True)`` for SA models.
    """
    ema = ema_key_of(state_dict)
    if ema is not None:
        # timm's own load_checkpoint(use_ema=True) would take the EMA's: say which we took.
        warn_user(f"the checkpoint also holds EMA weights ('{ema}'); loaded the model's weights. "
                  f"To use the EMA's, extract them: sanet convert FILE OUT.safetensors --model "
                  f"{(getattr(model, 'pretrained_cfg', None) or {}).get('architecture', 'M')} --ema")
    state_dict = weights_of(state_dict)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    exempt: List[str] = []
    head: List[str] = []
    # What timm adapts after this filter: it discards the file's classifier when num_classes
    # differs from the pretrained config's (a new head, or none with num_classes=0), and
    # converts the first conv when in_chans differs from the config's input channels. Any
    # other difference would reach load_state_dict's generic error: say what to pass.
    classifier, first_conv = cfg.get("classifier"), cfg.get("first_conv")
    if isinstance(classifier, str):
        if model.num_classes != cfg.get("num_classes"):
            head = [f"{classifier}.weight", f"{classifier}.bias"]
            state_dict = {k: v for k, v in state_dict.items() if k not in head}
        else:
            _check_dim(state_dict, f"{classifier}.weight", 0, model.num_classes, "classes", "num_classes")
    if isinstance(first_conv, str):
        in_chans = model.get_submodule(first_conv).in_channels
        if in_chans != (cfg.get("input_size") or (3,))[0]:
            exempt.append(f"{first_conv}.weight")
        else:
            _check_dim(state_dict, f"{first_conv}.weight", 1, in_chans, "input channels", "input_size")
    return check_state_dict(state_dict, model, shape_exempt=exempt, missing_ok=head)


def _check_dim(state_dict: Dict[str, Tensor], key: str, dim: int, expected: int, what: str, cfg_key: str) -> None:
    # Reached only when the pretrained config given to create_model (pretrained_cfg or
    # pretrained_cfg_overlay) overrides what sanet reads off the file and the model follows it.
    w = state_dict.get(key)
    if w is not None and w.dim() > dim and w.shape[dim] != expected:
        raise CheckpointMismatchError(
            f"checkpoint does not match the model: its {key} has {w.shape[dim]} {what}, the model "
            f"{expected}, as the pretrained config passed to create_model sets ({cfg_key}); leave {cfg_key} out "
            "of pretrained_cfg / pretrained_cfg_overlay: the file then sets it")


def with_sa_groups_of(state_dict: Dict[str, Tensor], name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``create_model`` kwargs for ``name`` with ``sa_groups`` set to what the weights were
    built with (e.g. a run trained with ``--model-kwargs sa_groups=32``), unless the kwargs
    already name one. Checked on the meta device: nothing is allocated."""
    import timm

    if "sa_groups" in kwargs:
        return dict(kwargs)
    groups = sa_groups_of(state_dict, timm.create_model(name, device="meta", **kwargs))
    return dict(kwargs) if groups is None else dict(kwargs, sa_groups=groups)
