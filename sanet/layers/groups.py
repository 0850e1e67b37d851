"""Which group counts G a Shuffle Attention layer can use.

SA splits C channels into G groups and each group into two halves, so C must be divisible
by 2G (SA-NET.md section 1). Narrow layers need a smaller G than the default 64; the
authors advise 32 or 16 when channels are few.
"""
from __future__ import annotations

import numbers
from typing import List

__all__ = ["valid_sa_groups", "fit_sa_groups", "check_sa_groups"]


def valid_sa_groups(channels: int) -> List[int]:
    """All G with ``channels % (2 * G) == 0``, ascending (empty for odd or non-positive C)."""
    if channels <= 0 or channels % 2:
        return []
    half = channels // 2
    return [g for g in range(1, half + 1) if half % g == 0]


def check_sa_groups(channels: int, groups: int) -> None:
    """Raise ``ValueError`` naming the valid choices when ``channels`` can't be split into ``groups``."""
    # numbers.Integral: numpy integers too (channel counts often come from array shapes)
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels <= 0:
        raise ValueError(f"ShuffleAttention: channels must be a positive int, got {channels!r}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups <= 0:
        raise ValueError(f"ShuffleAttention: groups must be a positive int, got {groups!r}")
    if channels % (2 * groups) != 0:
        if channels % 2:
            hint = (f"{channels} channels is odd, so no group count works: SA splits every group "
                    "into two halves (use an even channel count)")
        else:
            hint = (f"valid groups for {channels} channels: {valid_sa_groups(channels)}. "
                    f"sanet.fit_sa_groups({channels}, {groups}) picks the largest valid one")
        raise ValueError(
            f"ShuffleAttention: channels ({channels}) must be divisible by 2 * groups "
            f"(2 * {groups} = {2 * groups}); {hint}."
        )


def fit_sa_groups(channels: int, groups: int = 64) -> int:
    """Largest valid G that is not above ``groups`` (e.g. 64 channels, G=64 -> 32).

    Use it for narrow layers, such as the 64-channel stage of SA-ResNet-18/34.
    """
    valid = [g for g in valid_sa_groups(channels) if g <= groups]
    if not valid:
        raise ValueError(
            f"fit_sa_groups: no valid group count <= {groups} for {channels} channels "
            f"(C must be even and divisible by 2G)"
        )
    return valid[-1]
