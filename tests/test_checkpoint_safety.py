"""Checkpoint files are data, never code: malicious pickles refused everywhere a file is read
(timm.create_model, sanet.checkpoint, sanet convert), formats read from content, files that are
no checkpoint named as such, and atomic saves."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import sanet
from sanet.checkpoint import (
    UnsafeCheckpointError,
    atomic_torch_save,
    load_checkpoint_file,
    load_weights,
    save_safetensors,
)
from sanet.cli import main as cli_main


def load_pretrained(name: str, file, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)


# --------------------------------------------------------------------------- malicious pickle
class _Payload:
    """Unpickling this object opens (creates) ``marker``: stands for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_checkpoint(tmp_path: Path, name: str) -> tuple:
    marker = tmp_path / f"{name}.pwned"
    sd = {f"module.{k}": v for k, v in timm.create_model("sa_resnet_test").state_dict().items()}
    path = tmp_path / f"{name}.pth.tar"
    torch.save({"epoch": 1, "state_dict": sd, "best_acc1": _Payload(str(marker))}, path)
    return path, marker


def test_the_payload_is_live(tmp_path):
    """Control: loading the file the unsafe way does run the payload."""
    path, marker = _malicious_checkpoint(tmp_path, "control")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_pickle_refused_by_timm_create_model(tmp_path, monkeypatch):
    """Refused whatever timm does with files: here timm's loader is replaced by an unsafe one
    (timm 1.0.21-1.0.25 used torch.load(weights_only=False)); sanet reads the file itself."""
    import timm.models._builder as builder

    path, marker = _malicious_checkpoint(tmp_path, "timm")
    monkeypatch.setattr(builder, "load_state_dict", lambda f, *a, **k: torch.load(f, weights_only=False))
    with pytest.raises(UnsafeCheckpointError, match="refused to load.*executed nothing"):
        load_pretrained("sa_resnet_test", path)
    assert not marker.exists()


def test_malicious_pickle_refused_by_sanet_checkpoint(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path, "sanet")
    with pytest.raises(UnsafeCheckpointError, match="refused to load.*executed nothing"):
        load_checkpoint_file(path)
    with pytest.raises(UnsafeCheckpointError):
        load_weights(timm.create_model("sa_resnet_test"), path)
    assert not marker.exists()


def test_malicious_pickle_refused_by_sanet_convert(tmp_path, capsys):
    path, marker = _malicious_checkpoint(tmp_path, "convert")
    out = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(path), str(out), "--model", "sa_resnet_test"]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "executed nothing" in err
    assert not marker.exists() and not out.exists()


def test_format_is_read_from_the_content_not_the_name(tmp_path):
    model = timm.create_model("sa_resnet_test")
    path = tmp_path / "weights.pth"  # a safetensors file with a .pth name
    save_safetensors(model.state_dict(), path)
    loaded = load_pretrained("sa_resnet_test", path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_torch_save_file_named_safetensors_loads_by_its_content(tmp_path, legacy):
    """The name says safetensors, the bytes say torch.save: the bytes win (torch.load itself
    would read any path ending in .safetensors as safetensors)."""
    model = timm.create_model("sa_resnet_test")
    path = tmp_path / "weights.safetensors"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    loaded = load_checkpoint_file(path)
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    via_timm = load_pretrained("sa_resnet_test", path)
    assert torch.equal(via_timm.layer4[0].sa.cbias, model.layer4[0].sa.cbias)


def test_malicious_pickle_named_safetensors_is_refused(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path, "renamed")
    renamed = path.rename(tmp_path / "renamed.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="refused to load.*executed nothing"):
        load_checkpoint_file(renamed)
    assert not marker.exists()


def test_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {tmp_path / 'nope.pth'}"):
        load_pretrained("sa_resnet_test", tmp_path / "nope.pth")


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b"<!DOCTYPE html><html>",
                                     b"PK\x03\x04 truncated zip"])
def test_not_a_checkpoint_is_a_clear_error(tmp_path, content):
    """Text, a web page saved as .pth.tar, a damaged zip: "not a PyTorch checkpoint", not the
    warning about pickled code meant for real pickles."""
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(RuntimeError) as info:
        load_checkpoint_file(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert str(path) in str(info.value) and "not a PyTorch checkpoint" in str(info.value)


def test_truncated_checkpoints_are_named_damaged_at_any_length(tmp_path):
    """A download or copy cut short: some lengths made the zip reader seek before the file's
    start (OSError "Invalid argument"), which came out as a traceback without the file."""
    buf = io.BytesIO()
    torch.save({"model": timm.create_model("sa_resnet_test").state_dict(), "epoch": 1}, buf)
    data, path = buf.getvalue(), tmp_path / "cut.pt"
    for n in (100, 5085, 9073, 50_000, 68_000, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:n])
        with pytest.raises(sanet.SanetError, match=f"{path}: not a PyTorch checkpoint, or a damaged one"):
            load_checkpoint_file(path)


def test_an_unreadable_file_is_not_called_damaged(tmp_path, monkeypatch):
    path = tmp_path / "locked.pt"
    torch.save({"a": torch.ones(1)}, path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(PermissionError):  # the CLI reports it as it is (a user error)
        load_checkpoint_file(path)


# --------------------------------------------------------------------------- atomic saves
def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"v": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary file left behind


def test_atomic_write_goes_through_symlinks_and_refuses_special_files(tmp_path):
    """os.replace puts the new file in place of whatever the path names: a symlink (or a FIFO,
    a device) was replaced instead of written."""
    from sanet.checkpoint import write_json_atomic

    target = tmp_path / "real" / "out.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json_atomic({"a": 1}, link)
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        write_json_atomic({"a": 1}, fifo)
    assert fifo.exists() and not fifo.is_file()
