"""Which group counts G a Shuffle Attention layer can use.

SA splits C channels into G groups and each group into two halves, so C must be divisible
by 2G (SA-NET.md section 1). Narrow layers need a smaller G than the default 64; the
authors advise 32 or 16 when channels are few.
"""
from __future__ import annotations

import numbers
from typing import List

__all__ = ["valid_sa_groups", "fit_sa_groups", "check_sa_groups", "is_positive_int"]


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an int > 0: numpy integers too (channel counts often come from
    array shapes); not bool, float or str (2.5 or "64" would otherwise be truncated or fail
    deep inside a model)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value > 0


def _int_error(where: str, name: str, value: object, valid: str) -> ValueError:
    return ValueError(f"{where}: {name} must be a positive int ({valid}), got {value!r} "
                      f"of type {type(value).__name__}")


def _odd_hint(channels: int) -> str:
    return (f"{channels} channels is odd, so no group count works: SA splits every group "
            "into two halves (use an even channel count)")


def valid_sa_groups(channels: int) -> List[int]:
    """All G with ``channels % (2 * G) == 0``, ascending (empty for odd or non-positive C)."""
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral):
        raise ValueError("valid_sa_groups: channels must be an int (the layer's channel count C), "
                         f"got {channels!r} of type {type(channels).__name__}")
    if channels <= 0 or channels % 2:
        return []
    half = int(channels) // 2
    return [g for g in range(1, half + 1) if half % g == 0]


def check_sa_groups(channels: int, groups: int, *, name: str = "ShuffleAttention") -> None:
    """Raise ``ValueError`` naming the valid choices when ``channels`` can't be split into
    ``groups``; ``name`` is who asked (the layer, or a functional form)."""
    if not is_positive_int(channels):
        raise _int_error(name, "channels", channels, "the layer's channel count C")
    if not is_positive_int(groups):
        valid = valid_sa_groups(channels)
        raise _int_error(name, "groups", groups,
                         f"valid groups for {channels} channels: {valid}" if valid else _odd_hint(channels))
    if channels % (2 * groups) != 0:
        if channels % 2:
            hint = _odd_hint(channels)
        else:
            hint = (f"valid groups for {channels} channels: {valid_sa_groups(channels)}. "
                    f"sanet.fit_sa_groups({channels}, {groups}) picks the largest valid one")
            if name == "ShuffleAttention":
                hint += ", and ShuffleAttention.fitted(channels, groups) builds with it (e.g. as timm's attn_layer)"
        raise ValueError(
            f"{name}: channels ({channels}) must be divisible by 2 * groups "
            f"(2 * {groups} = {2 * groups}); {hint}."
        )


def fit_sa_groups(channels: int, groups: int = 64) -> int:
    """Largest valid G that is not above ``groups`` (e.g. 64 channels, G=64 -> 32).

    Use it for narrow layers, such as the 64-channel stage of SA-ResNet-18/34.
    """
    if not is_positive_int(channels):
        raise _int_error("fit_sa_groups", "channels", channels, "the layer's channel count C")
    if not is_positive_int(groups):
        raise _int_error("fit_sa_groups", "groups", groups, "the largest group count G wanted, e.g. 64")
    valid = [g for g in valid_sa_groups(channels) if g <= groups]
    if not valid:  # G = 1 fits every even C, so C is odd
        raise ValueError(f"fit_sa_groups: no valid group count <= {groups} for {channels} channels: "
                         f"{_odd_hint(channels)}")
    return valid[-1]
