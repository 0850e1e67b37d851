"""Argument checks of the fused op's Python entry points.

The kernels index every tensor from ``x``'s geometry (C channels, C / (2G) gate values), so
a tensor of another size would be read or written out of bounds. The C++ kernel checks the
same in C++ (``csrc/shuffle_attention.cpp``); the Triton launchers and
``shuffle_attention_fused`` check here, with the layer's wording (and the valid group counts).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

from torch import Tensor

__all__ = ["check_op_args", "check_eps"]

_PARAM_NAMES = ("cweight", "cbias", "sweight", "sbias", "gn_weight", "gn_bias")
_BN_NAMES = ("bn_weight", "bn_bias", "bn_mean", "bn_var")


def check_op_args(fn: str, x: Tensor, shortcut: Optional[Tensor], params: Sequence[Tensor], groups: int,
                  bn: Sequence[Optional[Tensor]] = ()) -> None:
    """Raise ``ValueError`` unless ``x`` is (N, C, *), ``groups`` fits C, every gate parameter
    holds C / (2 * groups) values, the shortcut matches x, and BatchNorm tensors hold C."""
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must be (N, C, *) with channels in dim 1, got shape {list(x.shape)}")
    channels = x.shape[1]
    # Fast test first: this runs on every call; check_sa_groups builds the message.
    if type(groups) is not int or groups <= 0 or channels % (2 * groups):
        from ..layers.groups import check_sa_groups  # sanet.layers imports sanet.ops

        check_sa_groups(channels, groups, name=fn)
    c = channels // (2 * groups)
    for name, p in zip(_PARAM_NAMES, params):
        if p.numel() != c:
            raise ValueError(
                f"{fn}: {name} must hold C / (2 * groups) = {channels} / (2 * {groups}) = {c} "
                f"values (shape (1, {c}, 1, 1) or ({c},)), got shape {list(p.shape)}")
    if shortcut is not None and (shortcut.shape != x.shape or shortcut.dtype != x.dtype):
        raise ValueError(f"{fn}: shortcut must have x's shape {list(x.shape)} and dtype {x.dtype}, got "
                         f"{list(shortcut.shape)} {shortcut.dtype}")
    for name, t in zip(_BN_NAMES, bn):
        if t is not None and t.numel() != channels:
            raise ValueError(f"{fn}: {name} must hold one value per channel ({channels}), got shape "
                             f"{list(t.shape)}")


def check_eps(fn: str, eps: float) -> None:
    """Raise ``ValueError`` unless ``eps`` is a positive finite number. A constant plane has
    variance 0: rsqrt(0 + eps) is NaN for eps < 0 and inf for 0 (then 0 * inf = NaN)."""
    if type(eps) is float and 0.0 < eps < float("inf"):  # the common case, cheaply
        return
    # `not 0 < eps` also catches NaN
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < float("inf"):
        raise ValueError(f"{fn}: eps must be a positive finite number (GroupNorm's epsilon, default 1e-5), "
                         f"got {eps!r}")
