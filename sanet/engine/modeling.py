"""Create models for training and inference; read weights and class names safely.

Every file is read with :func:`sanet.checkpoint.load_checkpoint_file` (``weights_only=True``)
and checked strictly against the model, so a checkpoint of another architecture is a clear
error, never a silent partial load.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import SanetError

__all__ = ["create_train_model", "LoadedModel", "load_for_inference",
           "check_checkpoint_model", "imagenet_class_names", "to_channels_last"]


def _classifier_size(state_dict: Dict[str, torch.Tensor], model_name: str) -> Optional[int]:
    import timm

    clf = timm.models.get_pretrained_cfg(model_name)
    name = (clf.classifier if clf is not None else None) or "fc"
    weight = state_dict.get(f"{name}.weight")
    return None if weight is None else int(weight.shape[0])


def _has_stem(state_dict: Dict[str, torch.Tensor], model_name: str) -> bool:
    """Whether the weights hold the model's first conv (they are that model's, whole or not)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    first_conv = (cfg.first_conv if cfg is not None else None) or "conv1"
    return f"{first_conv}.weight" in state_dict


def _check_rgb_stem(state_dict: Dict[str, torch.Tensor], model: nn.Module, model_name: str,
                    source: Path) -> None:
    """eval and predict read images as RGB and build the model for them: weights whose first
    conv takes another number of input channels than that model's (a model built with
    in_chans=1, say) can't be fed by them. (Compared with the model, not with 3: some stems
    take more, e.g. TResNet's after its space-to-depth.)"""
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv") or "conv1"
    key = f"{first_conv}.weight" if isinstance(first_conv, str) else None
    file_w, model_w = state_dict.get(key), model.state_dict().get(key)
    if (isinstance(file_w, torch.Tensor) and isinstance(model_w, torch.Tensor) and file_w.dim() == model_w.dim() == 4
            and file_w.shape[1] != model_w.shape[1]):
        a, b = int(file_w.shape[1]), int(model_w.shape[1])
        in_chans = f"in_chans={a}" if b == 3 else "the in_chans it was built with"
        raise SanetError(
            f"{source}: {model_name}'s first conv ({first_conv}) takes {a}-channel input in this file, {b} in the "
            f"model for RGB images: the weights were built for other input. sanet eval and predict read every "
            f"image as RGB; use the file from Python: timm.create_model({model_name!r}, {in_chans}, "
            f"pretrained=True, pretrained_cfg_overlay=dict(file=...)) with your own preprocessing")


def _registered_arch(checkpoint: Any, path: Path) -> Optional[str]:
    """The architecture a weights file records, if it is a model timm knows: ``arch`` in the
    authors' layout, ``args['model']`` in a ``sanet train`` checkpoint, ``model`` in the
    metadata of a ``sanet convert`` safetensors file."""
    import timm

    from sanet.checkpoint import safetensors_metadata

    arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    if arch is None and isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict):
        arch = checkpoint["args"].get("model")
    if arch is None:
        arch = safetensors_metadata(path).get("model")
    return arch if isinstance(arch, str) and timm.is_model(arch) else None


def _same_arch(model_name: str, recorded: Optional[str], path: Path, hint: str = "") -> None:
    """A file that names its architecture (pretrained tags aside) must name ``model_name``'s."""
    from timm.models import get_arch_name

    if isinstance(recorded, str) and get_arch_name(model_name) != get_arch_name(recorded):
        raise ValueError(f"--model {model_name}: {path} says it holds {recorded} weights; pass --model "
                         f"{recorded}{hint}")


def _safetensors_weights(path: Path) -> Optional[str]:
    """Whose weights ``sanet convert`` wrote to a file (``"ema"`` or ``"model"``; None: not said)."""
    from sanet.checkpoint import safetensors_metadata

    return safetensors_metadata(path).get("weights")


def _ema_refusal(path: Path) -> str:
    """Why --ema doesn't apply to a weights file that is not a sanet train checkpoint."""
    weights = _safetensors_weights(path)
    if weights == "ema":
        return f"--ema: {path} already holds its run's EMA weights (converted with --ema); drop --ema"
    if weights == "model":
        return (f"--ema: {path} holds its run's model weights (converted without --ema); convert the run's "
                "checkpoint again with sanet convert --ema for the EMA's")
    return ("--ema applies to checkpoints that hold EMA weights: sanet train runs with --model-ema, timm "
            "train.py checkpoints with 'state_dict_ema'")


def create_train_model(name: str, num_classes: int, *, pretrained_file: Optional[Path] = None,
                       drop_path: float = 0.0, model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """``timm.create_model`` for training, optionally starting from a weights file.

    ``pretrained_file`` goes through timm's pretrained loading (``pretrained_cfg_overlay``), so
    timm drops the classifier when the class count differs and the SA checkpoint filter checks
    every other key strictly.
    """
    import sanet  # noqa: F401  (registers the SA models)

    kwargs: Dict[str, Any] = dict(model_kwargs or {}, num_classes=num_classes)
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if pretrained_file is None:
        return _create(name, model_kwargs, **kwargs)
    from sanet.checkpoint import load_checkpoint_file, state_dict_from
    from sanet.models import CheckpointMismatchError, with_sa_groups_of
    from sanet.models.checkpoint_filter import ema_key_of

    raw = load_checkpoint_file(pretrained_file)
    _same_arch(name, _registered_arch(raw, pretrained_file), pretrained_file)
    state_dict = state_dict_from(raw, pretrained_file)
    ema_key = ema_key_of(raw)
    if ema_key is not None and os.environ.get("RANK", "0") == "0":  # (a --model-ema run's best.pt is the EMA's best)
        print(f"sanet train: note: {pretrained_file} also holds EMA weights ('{ema_key}'); fine-tuning starts from "
              f"the model's weights (sanet convert --ema makes a file of the EMA's)", file=sys.stderr)
    try:
        kwargs = with_sa_groups_of(state_dict, name, kwargs)  # fine-tune the G it was trained with
    except TypeError as exc:
        _refuse_drop_path(name, kwargs, model_kwargs, exc)
        if not model_kwargs:
            raise
        raise _kwargs_error(name, model_kwargs, exc) from None
    # The user's overlay (e.g. mean/std; weight sources are refused) under the file's weights.
    overlay: Dict[str, Any] = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, state_dict=state_dict)
    file_classes = _classifier_size(state_dict, name)
    if file_classes is not None:
        overlay["num_classes"] = file_classes  # timm keeps the classifier only if this matches
    try:
        model = _create(name, model_kwargs, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"--pretrained-file {pretrained_file}: {exc}"
                                      f"{_saved_kwargs_hint(raw, pretrained_file, model_kwargs)}") from None
    except RuntimeError as exc:
        # Models without our checkpoint filter (any other timm model): PyTorch's strict load
        # lists every key over many lines; keep its first, shortened, with the file named.
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        detail = " ".join(str(exc).split())
        raise CheckpointMismatchError(
            f"--pretrained-file {pretrained_file}: checkpoint does not match {name} "
            f"({detail[:400]}{'...' if len(detail) > 400 else ''})") from None
    if os.environ.get("RANK", "0") == "0":  # what happens to the head is easy to miss: say it (once loaded)
        head = (f"its classifier of {file_classes} classes is kept (output i is --data's i-th class folder "
                "in sorted order)" if file_classes == num_classes else
                f"a new classifier for --data's {num_classes} classes replaces "
                f"{f'its {file_classes}-class one' if file_classes else 'none (the file has no classifier)'}")
        print(f"sanet train: note: fine-tuning from {pretrained_file}: {head}", file=sys.stderr)
    return model


def _is_train_checkpoint(raw: Any) -> bool:
    """Whether a loaded file is a ``sanet train`` checkpoint (weights, class names, args)."""
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "class_names" in raw


def _saved_kwargs_hint(raw: Any, source: Path, given: Optional[Dict[str, Any]]) -> str:
    """For a fine-tuning file that does not match: the ``--model-kwargs`` its run was trained
    with (a ``sanet train`` checkpoint's, or a file ``sanet convert`` made from one) that this
    command does not repeat. Fine-tuning builds the model from the command line's kwargs (only
    the SA group count is read off the weights), so e.g. ``norm_layer=groupnorm1`` must be
    given again; without this the mismatch reads like a file of another architecture."""
    saved: Any = None
    try:
        if _is_train_checkpoint(raw):
            saved = raw["args"].get("model_kwargs") if isinstance(raw.get("args"), dict) else None
        else:
            from sanet.checkpoint import converted_run_metadata

            saved = converted_run_metadata(source).get("model_kwargs")
    except Exception:  # a hint only: never mask the mismatch itself
        return ""
    if not isinstance(saved, dict):
        return ""
    given = given or {}
    missing = {k: v for k, v in saved.items()
               if k != "sa_groups" and not (k == "in_chans" and v == 3) and given.get(k) != v}
    if not missing:
        return ""
    return (f"\n  ({source} was trained with --model-kwargs "
            f"{' '.join(f'{k}={v!r}' for k, v in missing.items())}: fine-tuning takes the model's "
            "kwargs from the command line (only the SA group count is read off the weights), so "
            "pass them again)")


def _create(name: str, model_kwargs: Optional[Dict[str, Any]], **kwargs: Any) -> nn.Module:
    """``timm.create_model``; a keyword the model does not take (or a value of the wrong type)
    in ``--model-kwargs`` is the user's error, reported as such."""
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, KeyError) as exc:  # KeyError: timm's lookup of a layer name (norm_layer=...)
        _refuse_drop_path(name, kwargs, model_kwargs, exc)
        if not model_kwargs:
            raise
        raise _kwargs_error(name, model_kwargs, exc) from None


def _refuse_drop_path(name: str, kwargs: Dict[str, Any], model_kwargs: Optional[Dict[str, Any]],
                      exc: Exception) -> None:
    """--drop-path (drop_path_rate) for a model whose blocks take none (e.g. timm's DLA, VGG)."""
    rate = kwargs.get("drop_path_rate")
    if rate and "drop_path_rate" not in (model_kwargs or {}) and isinstance(exc, TypeError) \
            and "drop_path_rate" in str(exc):
        raise ValueError(f"--drop-path {rate:g}: {name} has no stochastic depth (it takes no drop_path_rate); "
                         "leave --drop-path out") from None


def _kwargs_error(name: str, model_kwargs: Dict[str, Any], exc: Exception) -> ValueError:
    why = f"unknown name {exc}" if isinstance(exc, KeyError) else str(exc)
    return ValueError(f"--model-kwargs {' '.join(f'{k}={v!r}' for k, v in model_kwargs.items())}: "
                      f"{name} does not accept {'it' if len(model_kwargs) == 1 else 'one of them'} ({why})")


def check_checkpoint_model(ckpt: Dict[str, Any], model_name: Optional[str], source: str) -> str:
    """The architecture a training checkpoint was made with (must equal ``model_name`` if given)."""
    saved = (ckpt.get("args") or {}).get("model") if isinstance(ckpt.get("args"), dict) else None
    if saved is None:
        saved = ckpt.get("arch")
    if model_name and saved and saved != model_name:
        raise ValueError(f"{source} is a checkpoint of {saved}, not {model_name} "
                         f"(pass --model {saved}, or the checkpoint of a {model_name} run)")
    if not (model_name or saved):
        raise ValueError(f"{source} does not name its architecture; pass --model")
    return model_name or saved


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class descriptions, from the list bundled with timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def _converted_run_info(path: Path, num_classes: int) -> Dict[str, Any]:
    """What ``sanet convert`` kept of a ``sanet train`` checkpoint in a safetensors file's
    metadata (class names, img_size, crop_pct, interpolation, model_kwargs; JSON strings)."""
    from sanet.checkpoint import converted_run_metadata

    info = converted_run_metadata(path)
    names = info.get("class_names")
    if names is not None:
        if not isinstance(names, list) or len(names) != num_classes:
            raise SanetError(f"{path}: its metadata names {len(names) if isinstance(names, list) else 'no list of'} "
                             f"classes, its classifier has {num_classes}; convert the checkpoint again with "
                             "sanet convert")
        info["class_names"] = [str(c) for c in names]
    return info


# create_model kwargs a weights file may not set: they would load other weights (a download,
# another file) or contradict what the file's own tensors decide. (pretrained_cfg_overlay may
# set data settings such as mean and std: only its weight sources are refused.)
_REFUSED_FILE_KWARGS = ("pretrained", "pretrained_cfg", "checkpoint_path", "num_classes", "in_chans",
                        "features_only")

# pretrained_cfg fields that say where weights come from.
_WEIGHT_SOURCES = ("file", "url", "hf_hub_id", "hf_hub_filename", "state_dict", "source")


def overlay_weight_sources(model_kwargs: Dict[str, Any]) -> List[str]:
    """The weight-source fields a ``pretrained_cfg_overlay`` in ``model_kwargs`` sets (an
    overlay that is not a dict counts as one, named ``pretrained_cfg_overlay``)."""
    overlay = model_kwargs.get("pretrained_cfg_overlay")
    if overlay is None:
        return []
    if not isinstance(overlay, dict):
        return ["pretrained_cfg_overlay"]
    return sorted(k for k in overlay if k in _WEIGHT_SOURCES)


def _checked_settings(source: Path, data_args: Dict[str, Any], model_kwargs: Any) -> Dict[str, Any]:
    """The data settings and model kwargs a checkpoint or converted file carries, checked
    (the file may come from anywhere): model kwargs that load or reshape nothing, a positive
    int image size, a positive crop fraction, a known interpolation."""
    from .config import INTERPOLATIONS

    def bad(what: str) -> SanetError:
        # no flag overrides these: they come with the weights, so the only cure is a sound file
        return SanetError(f"{source}: its saved {what}; the file is damaged or was not written by sanet "
                          "(write it again from the training run: sanet convert last.pt OUT.safetensors)")

    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise bad(f"model_kwargs are not a dict of names ({type(model_kwargs).__name__})")
    if type(model_kwargs.get("in_chans")) is int and model_kwargs["in_chans"] == 3:
        # a run trained with --model-kwargs in_chans=3 (to convert a 1-channel file's first
        # conv): its weights take RGB, as the file's own first conv says; nothing to pass
        model_kwargs = {k: v for k, v in model_kwargs.items() if k != "in_chans"}
    refused = sorted(k for k in model_kwargs if k in _REFUSED_FILE_KWARGS) + [
        f"pretrained_cfg_overlay {k}" if k != "pretrained_cfg_overlay" else
        "a pretrained_cfg_overlay that is not a dict" for k in overlay_weight_sources(model_kwargs)]
    if refused:
        raise bad(f"model_kwargs set {', '.join(refused)}, which a weights file may not (they would load "
                  "other weights or contradict the file's own)")
    size, crop, interp = (data_args.get(k) for k in ("img_size", "crop_pct", "interpolation"))
    if size is not None and not (type(size) is int and size > 0):
        raise bad(f"img_size is {size!r}, not a positive int")
    if crop is not None and not (type(crop) in (int, float) and crop > 0):
        raise bad(f"crop_pct is {crop!r}, not a positive number")
    if interp is not None and interp not in INTERPOLATIONS:
        raise bad(f"interpolation is {interp!r}, not one of {', '.join(INTERPOLATIONS)}")
    return dict(model_kwargs)


def _groups_read_off(state_dict: Dict[str, torch.Tensor], name: str, model_kwargs: Dict[str, Any],
                     source: Path) -> Dict[str, Any]:
    """``model_kwargs`` with the SA group count of the weights (see ``with_sa_groups_of``)."""
    from sanet.models import with_sa_groups_of

    try:
        return with_sa_groups_of(state_dict, name, model_kwargs)
    except TypeError as exc:  # saved kwargs this timm's model does not take
        raise SanetError(f"{source}: its saved model kwargs {model_kwargs} do not fit {name} in this "
                         f"version of timm ({exc})") from None


@dataclass
class LoadedModel:
    """A model ready for inference and what is known about its inputs and labels."""

    model: nn.Module
    name: str
    class_names: Optional[List[str]]
    data_args: Dict[str, Any] = field(default_factory=dict)  # img_size/crop_pct/... of training
    ema: bool = False  # EMA weights were loaded (--ema, or a file converted with --ema)
    unused_ema: Optional[str] = None  # the key of EMA weights the file holds besides those loaded


def load_for_inference(model_name: Optional[str], *, checkpoint: Optional[Path] = None,
                       pretrained_file: Optional[Path] = None, use_ema: bool = False) -> LoadedModel:
    """Model + class names from a ``sanet train`` checkpoint or any weights file."""
    import sanet  # noqa: F401
    from sanet.checkpoint import load_checkpoint_file, state_dict_from
    from sanet.models import check_state_dict, strip_prefix

    if (checkpoint is None) == (pretrained_file is None):
        raise ValueError("pass exactly one of --checkpoint (a sanet train checkpoint) or "
                         "--pretrained-file (any weights file)")
    source = checkpoint if checkpoint is not None else pretrained_file
    raw = load_checkpoint_file(source)
    # a `sanet train` checkpoint passed as --pretrained-file is read as one: its classes and
    # the image size it was trained at come with it
    is_run = _is_train_checkpoint(raw)
    if checkpoint is not None and not is_run:
        raise ValueError(f"{checkpoint} is not a sanet train checkpoint (no 'model'/'class_names'); "
                         "use --pretrained-file for other weight files")
    from sanet.models.checkpoint_filter import ema_key_of

    ema_key = ema_key_of(raw)
    if is_run:
        name = check_checkpoint_model(raw, model_name, str(source))
        key = "model_ema" if use_ema else "model"
        if raw.get(key) is None:
            raise ValueError(f"{source} has no EMA weights (trained without --model-ema)")
        state_dict = strip_prefix(raw[key])
        class_names = [str(c) for c in raw["class_names"]]
        args = raw.get("args") if isinstance(raw.get("args"), dict) else {}
        data_args = {k: args.get(k) for k in ("img_size", "crop_pct", "interpolation")}
        model_kwargs = _checked_settings(source, data_args, args.get("model_kwargs") or {})
        # runs fine-tuned from weights of another G before sanet stored it: read it off the weights
        model_kwargs = _groups_read_off(state_dict, name, model_kwargs, source)
        num_classes = len(class_names)
    else:
        if use_ema and ema_key is None:
            raise ValueError(_ema_refusal(source))
        recorded = _registered_arch(raw, source)
        if model_name:
            _same_arch(model_name, recorded, source, " (or leave --model out)")
        name = model_name or recorded
        if name is None:
            raise ValueError("--pretrained-file needs --model: the file names no registered architecture "
                             "(the authors' files name theirs in 'arch', `sanet convert` files in their "
                             "metadata)")
        # a timm train.py checkpoint keeps its EMA's weights under 'state_dict_ema'
        state_dict = strip_prefix(raw[ema_key]) if use_ema else state_dict_from(raw, source)
        num_classes = _classifier_size(state_dict, name)
        if num_classes is None and _has_stem(state_dict, name):
            raise SanetError(
                f"{source} has no classifier ({name} weights saved headless, e.g. with num_classes=0): "
                f"eval and predict need one. Fine-tune it first: sanet train --model {name} "
                f"--pretrained-file {source} --data DIR ...")
        num_classes = num_classes or 1000  # no stem either: the mismatch error lists the keys
        run_info = _converted_run_info(source, num_classes)  # a `sanet convert`ed run's
        class_names = run_info.get("class_names") or (imagenet_class_names() if num_classes == 1000 else None)
        data_args = {k: run_info[k] for k in ("img_size", "crop_pct", "interpolation") if k in run_info}
        model_kwargs = _checked_settings(source, data_args, run_info.get("model_kwargs") or {})
        model_kwargs = _groups_read_off(state_dict, name, model_kwargs, source)
    model = _create(name, model_kwargs, num_classes=num_classes, **model_kwargs)
    _check_rgb_stem(state_dict, model, name, source)
    model.load_state_dict(check_state_dict(state_dict, model, source=str(checkpoint or pretrained_file)))
    model.eval()
    # a file converted with --ema holds a run's EMA weights as its only weights
    converted_ema = not is_run and _safetensors_weights(source) == "ema"
    return LoadedModel(model, name, class_names, data_args, ema=use_ema or converted_ema,
                       unused_ema=None if use_ema else ema_key)


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)``, except for (1, C, 1, 1) parameters (SA's
    gates): channels_last gives them strides their gradients don't have, and DDP then warns
    and copies every such gradient into its bucket at each step."""
    model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        if p.dim() == 4 and p.shape[0] == 1 and p.shape[2:] == (1, 1):
            p.data = torch.empty(p.shape, dtype=p.dtype, device=p.device).copy_(p.data)
    return model
