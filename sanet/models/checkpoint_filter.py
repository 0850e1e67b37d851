"""Checkpoint adapters: ``(state_dict, model) -> state_dict`` filters, as timm uses them.

The authors' files (SA-NET.md section 3) are ``{'epoch', 'arch', 'state_dict', 'best_acc1',
'optimizer'}`` dicts whose keys carry DataParallel's ``module.`` prefix; otherwise their names
are ours (torchvision ResNet names plus ``layerI.J.sa.*``). Their loader used
``strict=False``, so a wrong file loaded silently; ours lists every missing, unexpected and
mis-shaped key instead.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from torch import Tensor, nn

__all__ = ["CheckpointMismatchError", "checkpoint_filter_fn", "check_state_dict", "strip_prefix"]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes don't match the model."""


def strip_prefix(state_dict: Dict[str, Tensor], prefix: str = "module.") -> Dict[str, Tensor]:
    """Drop a key prefix (DataParallel/DDP's ``module.``) where every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _fmt(keys: List[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    state_dict: Dict[str, Tensor],
    model: nn.Module,
    *,
    shape_exempt: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Raise :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys.

    ``shape_exempt`` names keys whose shape may differ (timm adapts the classifier and the
    first conv afterwards for another ``num_classes``/``in_chans``).
    """
    expected = model.state_dict()
    exempt = set(shape_exempt)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched: List[Tuple[str, tuple, tuple]] = [
        (k, tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state_dict and k not in exempt and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    lines = [f"{source} does not match {arch}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if mismatched:
        shown = [f"{k} {a} vs model {b}" for k, a, b in mismatched]
        lines.append(f"  shape mismatches ({len(mismatched)}): {_fmt(shown)}")
    lines.append("  (is this a checkpoint of another architecture or depth?)")
    raise CheckpointMismatchError("\n".join(lines))


def _unwrap(checkpoint: dict) -> Dict[str, Tensor]:
    # The PyTorch ImageNet example nests weights under 'state_dict'; ours under 'model'.
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> Dict[str, Tensor]:
    """Authors' layout (or ours) -> this model's state_dict, checked strictly.

    Used by ``timm.create_model(..., pretrained=True)`` for SA models.
    """
    state_dict = strip_prefix(_unwrap(state_dict))
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    exempt = []
    for name in (cfg.get("classifier"), cfg.get("first_conv")):
        if isinstance(name, str):
            exempt += [f"{name}.weight", f"{name}.bias"]
    check_state_dict(state_dict, model, shape_exempt=exempt)
    return state_dict
