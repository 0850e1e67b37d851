"""Edges of the checkpoint adapter and safe loader that mutation testing found unpinned:
the key-list cut-off at exactly 20, the group count of weights built with the model's own,
an explicit sa_groups, and a pretrained config that contradicts the file's input channels."""
from __future__ import annotations

import pytest
import timm
import torch

import sanet  # noqa: F401  (registers the SA models)
from sanet.models import check_state_dict
from sanet.models.checkpoint_filter import CheckpointMismatchError, sa_groups_of, with_sa_groups_of

NAME = "sa_resnet_test"


def test_weights_of_the_models_own_group_count_name_none():
    """sa_groups_of says a group count only where it differs: convert records sa_groups, and
    a train run puts it into its model kwargs, only for a non-default G."""
    model = timm.create_model(NAME, device="meta")
    assert sa_groups_of(model.state_dict(), model) is None
    assert with_sa_groups_of(model.state_dict(), NAME, {}) == {}
    g4 = timm.create_model(NAME, sa_groups=4, device="meta").state_dict()
    assert with_sa_groups_of(g4, NAME, {"num_classes": 1000}) == {"num_classes": 1000, "sa_groups": 4}


def test_an_explicit_group_count_is_kept():
    """The caller's sa_groups wins over the file's (a wrong one then fails to load, with a hint)."""
    g4 = timm.create_model(NAME, sa_groups=4, device="meta").state_dict()
    assert with_sa_groups_of(g4, NAME, {"sa_groups": 8}) == {"sa_groups": 8}


def test_a_pretrained_cfg_contradicting_the_files_input_channels_says_what_to_leave_out(tmp_path):
    rgb_file = tmp_path / "rgb.pth"
    torch.save(timm.create_model(NAME).state_dict(), rgb_file)
    with pytest.raises(CheckpointMismatchError,
                       match=r"conv1.weight has 3 input channels, the model 1, .*\(input_size\); leave input_size"):
        timm.create_model(NAME, pretrained=True, in_chans=1,
                          pretrained_cfg_overlay=dict(file=str(rgb_file), input_size=(1, 224, 224)))


@pytest.mark.parametrize("content", [b"\0" * 64, b"x" * 8 + b'{"a": 1}'],
                         ids=["zeros", "brace-at-byte-8"])
def test_files_that_only_half_look_like_safetensors_are_not_read_as_one(tmp_path, content):
    """A preallocated, never-written download (zeros: a header size of 0, but no JSON) and a
    '{' at byte 8 after a header size far above safetensors' 100 MB limit are not safetensors:
    the message says what torch.save writes, not that a safetensors file is damaged."""
    from sanet.checkpoint import load_checkpoint_file

    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(sanet.SanetError, match="not a PyTorch checkpoint") as info:
        load_checkpoint_file(path)
    assert "safetensors file" not in str(info.value)


@pytest.mark.parametrize("obj", [[torch.zeros(2)], torch.zeros(2)], ids=["list", "tensor"])
def test_a_checkpoint_that_is_not_a_dict_is_named(tmp_path, obj):
    from sanet.checkpoint import load_state_dict_file

    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(sanet.SanetError, match=f"expected a dict checkpoint, found {type(obj).__name__}"):
        load_state_dict_file(path)


def test_another_tools_safetensors_metadata_is_not_read(tmp_path):
    """Keys named like sanet's, without sanet's mark nor all of an older convert's records:
    they mean what the other tool meant ("bicubic" is no JSON run record)."""
    from sanet.checkpoint import converted_run_metadata, safetensors_metadata, save_safetensors

    path = tmp_path / "other.safetensors"
    save_safetensors({"w": torch.zeros(2)}, path, metadata={"model": "resnet50", "interpolation": "bicubic"})
    assert safetensors_metadata(path) == {}
    assert converted_run_metadata(path) == {}


class _NotAllowed:
    """A class torch.load(weights_only=True) does not allowlist."""


def test_a_legacy_format_pickle_with_objects_is_refused_as_unsafe(tmp_path):
    """torch.save's pre-1.6 format (a bare pickle): refused as unsafe like a zip archive,
    not called "not a PyTorch checkpoint"."""
    from sanet.checkpoint import UnsafeCheckpointError, load_checkpoint_file

    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2), "extra": _NotAllowed()}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_checkpoint_file(path)


def test_a_mismatch_in_a_model_whose_pretrained_cfg_is_none_is_reported(tmp_path):
    """A model of the user's own with pretrained_cfg = None gets the mismatch listing, named
    by its class, not an AttributeError."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.pretrained_cfg = None

    with pytest.raises(CheckpointMismatchError, match=r"checkpoint does not match Net:\n  missing keys \(1\): fc.bias"):
        check_state_dict({"fc.weight": torch.zeros(2, 2)}, Net())


def test_unsafe_globals_are_named_in_the_refusal(tmp_path):
    from sanet.checkpoint import UnsafeCheckpointError, load_checkpoint_file

    path = tmp_path / "objects.pt"
    torch.save({"w": torch.zeros(2), "extra": _NotAllowed()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"plain containers \(.*_NotAllowed\), which could run code"):
        load_checkpoint_file(path)


def test_a_1x1_conv_classifier_sets_the_class_count(tmp_path, capsys):
    """timm's DLA classifies with a 1x1 conv (fc.weight of N x C x 1 x 1): its file builds an
    N-class model, as a Linear classifier's does, instead of a headless one that then refused
    the file's fc keys (with a hint to leave --num-classes out, as it was)."""
    from engine_utils import run_cli
    from sanet.checkpoint import safetensors_metadata
    from sanet.models import cfg_from_weights

    state = timm.create_model("dla46_c", num_classes=10).state_dict()
    assert state["fc.weight"].dim() == 4
    assert cfg_from_weights(state, "fc", "base_layer.0")["num_classes"] == 10
    torch.save(state, tmp_path / "dla.pth")
    code, _, err = run_cli(capsys, ["convert", str(tmp_path / "dla.pth"), str(tmp_path / "dla.safetensors"),
                                    "--model", "dla46_c"])
    assert code == 0, err
    assert safetensors_metadata(tmp_path / "dla.safetensors")["num_classes"] == "10"
    with pytest.raises(CheckpointMismatchError, match="has a classifier of 10 classes, the model none: build the "
                                                      "model with num_classes=10"):
        check_state_dict(state, timm.create_model("dla46_c", num_classes=0, device="meta"))
