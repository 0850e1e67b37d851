"""Group-count helpers: valid_sa_groups, fit_sa_groups, ShuffleAttention.fitted."""
from __future__ import annotations

import re

import pytest

from sanet import ShuffleAttention, fit_sa_groups, valid_sa_groups


def brute_force_valid(channels: int) -> list:
    return [g for g in range(1, abs(channels) + 1) if channels > 0 and channels % (2 * g) == 0]


@pytest.mark.parametrize("channels", [1, 2, 3, 8, 12, 64, 96, 100, 256, 2048])
def test_valid_sa_groups_is_exactly_the_divisors(channels):
    assert valid_sa_groups(channels) == brute_force_valid(channels)


@pytest.mark.parametrize("channels", [0, -8, 7, 63])
def test_valid_sa_groups_empty_for_odd_or_non_positive(channels):
    assert valid_sa_groups(channels) == []


@pytest.mark.parametrize("channels,requested,expected", [
    (64, 64, 32),     # the 64-channel stage of SA-ResNet-18/34
    (128, 64, 64),
    (256, 64, 64),
    (96, 64, 48),
    (96, 40, 24),
    (24, 64, 12),
    (200, 64, 50),
    (32, 16, 16),
    (2, 64, 1),
    (30, 64, 15),
])
def test_fit_sa_groups_largest_valid_not_above(channels, requested, expected):
    got = fit_sa_groups(channels, requested)
    assert got == expected
    assert channels % (2 * got) == 0 and got <= requested
    assert not any(g > got for g in brute_force_valid(channels) if g <= requested)


def test_fit_sa_groups_default_is_64():
    assert fit_sa_groups(2048) == 64 and fit_sa_groups(64) == 32


@pytest.mark.parametrize("channels,requested", [(7, 64), (63, 16), (1, 1)])
def test_fit_sa_groups_error_odd_channels(channels, requested):
    with pytest.raises(ValueError, match=f"no valid group count <= {requested} for {channels} channels: .*odd"):
        fit_sa_groups(channels, requested)


@pytest.mark.parametrize("requested", [2.5, 2.0, "64", 0, -2, True, None])
def test_fit_sa_groups_rejects_bad_groups(requested):
    """2.5 used to give 2 and 0 to blame C; "64" and None raised TypeError from a comparison."""
    with pytest.raises(ValueError) as info:
        fit_sa_groups(64, requested)
    msg = str(info.value)
    assert "fit_sa_groups: groups must be a positive int" in msg and f"got {requested!r}" in msg
    assert "channels" not in msg  # C = 64 is fine


@pytest.mark.parametrize("channels", [64.0, "64", 0, -8, False])
def test_fit_sa_groups_rejects_bad_channels(channels):
    with pytest.raises(ValueError, match=re.escape("fit_sa_groups: channels must be a positive int "
                                                   f"(the layer's channel count C), got {channels!r}")):
        fit_sa_groups(channels, 64)


@pytest.mark.parametrize("channels", [96.0, "96", True, None])
def test_valid_sa_groups_rejects_non_integers(channels):
    """96.0 raised TypeError from range(); True counted as 1 channel."""
    with pytest.raises(ValueError, match=re.escape("valid_sa_groups: channels must be an int "
                                                   f"(the layer's channel count C), got {channels!r}")):
        valid_sa_groups(channels)


def test_group_helpers_accept_numpy_integers():
    np = pytest.importorskip("numpy")
    assert valid_sa_groups(np.int64(96)) == valid_sa_groups(96)
    got = fit_sa_groups(np.int64(64), np.int32(64))
    assert got == 32 and type(got) is int


@pytest.mark.parametrize("channels,requested,expected", [(64, 64, 32), (512, 64, 64), (96, 64, 48)])
def test_fitted_constructor(channels, requested, expected):
    m = ShuffleAttention.fitted(channels, requested, impl="torch")
    assert isinstance(m, ShuffleAttention)
    assert m.groups == expected and m.channels == channels and m.impl == "torch"
    assert m.cweight.shape == (1, channels // (2 * expected), 1, 1)


def test_every_valid_group_count_constructs_and_others_fail():
    channels = 48
    valid = set(valid_sa_groups(channels))
    for g in range(1, channels + 1):
        if g in valid:
            assert ShuffleAttention(channels, g).groups == g
        else:
            with pytest.raises(ValueError, match=re.escape(f"valid groups for 48 channels: {sorted(valid)}")):
                ShuffleAttention(channels, g)


# --------------------------------------------------------------------------- construction errors
@pytest.mark.parametrize("channels,groups,valid", [
    (96, 64, "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]"),
    (64, 64, "[1, 2, 4, 8, 16, 32]"),
    (200, 64, "[1, 2, 4, 5, 10, 20, 25, 50, 100]"),
])
def test_construction_error_names_valid_groups(channels, groups, valid):
    with pytest.raises(ValueError) as info:
        ShuffleAttention(channels, groups)
    msg = str(info.value)
    assert f"channels ({channels})" in msg and f"2 * {groups}" in msg
    assert f"valid groups for {channels} channels: {valid}" in msg
    assert "fit_sa_groups" in msg


@pytest.mark.parametrize("channels,groups,needle", [
    (7, 1, "odd"), (0, 1, "positive"), (-4, 1, "positive"), (16, 0, "positive"),
    (16, 2.0, "positive int"), (True, 1, "positive int"), (7, 0, "7 channels is odd"),
])
def test_construction_error_bad_values(channels, groups, needle):
    with pytest.raises(ValueError, match=needle) as info:
        ShuffleAttention(channels, groups)
    assert "fit_sa_groups" not in str(info.value)  # it can't help here


@pytest.mark.parametrize("groups", [2.5, "64", 0])
def test_construction_error_bad_groups_lists_valid_ones(groups):
    with pytest.raises(ValueError) as info:
        ShuffleAttention(96, groups)
    msg = str(info.value)
    assert "groups must be a positive int" in msg and f"got {groups!r}" in msg
    assert "valid groups for 96 channels: [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]" in msg


def test_numpy_integer_channel_counts_are_accepted():
    """Channel counts often come from array shapes (numpy integers); they are stored as int."""
    np = pytest.importorskip("numpy")
    sa = ShuffleAttention(np.int64(64), np.int32(8))
    assert type(sa.channels) is int and type(sa.groups) is int and sa.cweight.shape == (1, 4, 1, 1)
