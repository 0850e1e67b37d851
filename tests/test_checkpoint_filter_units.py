"""check_state_dict's details: how many keys its message lists, and BatchNorm step counters
that a file lacks."""
from __future__ import annotations

import pytest
import timm
import torch

import sanet  # noqa: F401  (registers the SA models)
from sanet.models import check_state_dict
from sanet.models.checkpoint_filter import CheckpointMismatchError


@pytest.mark.parametrize("count", [20, 25])
def test_long_key_lists_show_20_then_the_count_left(count):
    model = timm.create_model("sa_resnet_test", device="meta")
    state = dict(model.state_dict())
    dropped = [k for k in state if k.startswith("layer") and "num_batches_tracked" not in k][:count]
    for k in dropped:
        del state[k]
    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(state, model)
    line = next(line for line in str(info.value).splitlines() if "missing keys" in line)
    if count == 20:  # exactly 20: all of them, no "(0 more)"
        assert line == "  missing keys (20): " + ", ".join(dropped)
    else:
        assert line.startswith("  missing keys (25): ") and line.endswith(", ... (5 more)")
        assert all(k in line for k in dropped[:20]) and dropped[20] not in line


def test_missing_batchnorm_counters_are_returned_as_zero():
    model = timm.create_model("sa_resnet_test")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    counters = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    loaded = check_state_dict(state, model)
    assert counters and all(k in loaded for k in counters)
    assert all(loaded[k].dtype == torch.long and int(loaded[k]) == 0 for k in counters)
    model.load_state_dict(loaded)  # strict: loads


def test_group_count_is_read_only_off_every_sa_layer():
    from sanet.models.checkpoint_filter import sa_groups_of

    model = timm.create_model("sa_resnet_test", device="meta")
    state = timm.create_model("sa_resnet_test", sa_groups=4, device="meta").state_dict()
    assert sa_groups_of(state, model) == 4
    one_sa = next(k for k in state if k.endswith(".cweight"))
    assert sa_groups_of({k: v for k, v in state.items() if k != one_sa}, model) is None  # the file doesn't say


def test_an_empty_ema_entry_holds_no_ema_weights():
    from sanet.models.checkpoint_filter import ema_key_of

    assert ema_key_of({"model": {"w": torch.zeros(1)}, "model_ema": {}}) is None
    assert ema_key_of({"state_dict": {}, "state_dict_ema": {"w": torch.zeros(1)}}) == "state_dict_ema"
