"""What sanet.checkpoint writes and reads: safetensors files as the format defines them,
shared tensors, file modes, the records of older `sanet convert` files, and where weights are."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open

import sanet
from sanet.checkpoint import (
    SANET_MARK,
    converted_run_metadata,
    load_checkpoint_file,
    safetensors_metadata,
    save_safetensors,
    state_dict_from,
    write_json_atomic,
)
from sanet.models import weights_of

from engine_utils import subprocess_env


def test_safetensors_header_is_padded_to_8_bytes(tmp_path):
    """The format aligns the tensor data to 8 bytes (the sorted-metadata header is rewritten:
    its padding too); values of every length mod 8."""
    w = torch.arange(6.0)
    for i in range(8):
        path = tmp_path / f"w{i}.safetensors"
        save_safetensors({"w": w}, path, metadata={"model": "sa_resnet_test", "k": "x" * i})
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        assert (8 + n) % 8 == 0, (i, n)
        assert data[8:8 + n].decode().rstrip(" ").endswith("}")
        assert torch.equal(load_checkpoint_file(path)["w"], w)
        with safe_open(str(path), "pt") as f:  # safetensors' own reader
            assert f.metadata()["k"] == "x" * i and torch.equal(f.get_tensor("w"), w)


def test_shared_and_tied_tensors_save_and_load_back(tmp_path):
    """Tied weights (one tensor under two names) and views of it: written as separate copies."""
    w = torch.randn(4, 4)
    path = tmp_path / "tied.safetensors"
    save_safetensors({"embed.weight": w, "head.weight": w, "row": w[1]}, path)
    loaded = load_checkpoint_file(path)
    assert set(loaded) == {"embed.weight", "head.weight", "row"}
    assert torch.equal(loaded["embed.weight"], w) and torch.equal(loaded["head.weight"], w)
    assert torch.equal(loaded["row"], w[1])


def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path):
    """As open() would create them: 0o666 less the process's umask (read when sanet is imported)."""
    path = tmp_path / "card.json"
    code = ("import os, sys; os.umask(0o077)\n"
            "from sanet.checkpoint import write_json_atomic\n"
            "write_json_atomic({'a': 1}, sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600" and json.loads(path.read_text()) == {"a": 1}


def test_atomic_writes_in_this_process_get_its_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "card.json"
    write_json_atomic({"a": 1}, path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_files_of_an_older_convert_without_the_mark_keep_their_records(tmp_path):
    """`sanet convert` wrote model, num_classes, in_chans and source before it wrote
    sanet_version: such files are sanet's, and their class names are read."""
    path = tmp_path / "old.safetensors"
    meta = {"model": "sa_resnet_test", "num_classes": "3", "in_chans": "3", "source": "last.pt",
            "class_names": json.dumps(["cat", "dog", "owl"])}
    save_safetensors(timm.create_model("sa_resnet_test", num_classes=3).state_dict(), path, metadata=meta)
    assert safetensors_metadata(path) == meta
    assert converted_run_metadata(path) == {"class_names": ["cat", "dog", "owl"]}
    from sanet.engine.modeling import load_for_inference

    assert load_for_inference(None, pretrained_file=path).class_names == ["cat", "dog", "owl"]


def test_run_metadata_that_is_not_json_is_refused(tmp_path):
    """A marked file whose class_names entry is not JSON: refused, not loaded without its names."""
    from sanet.engine.modeling import load_for_inference

    path = tmp_path / "w.safetensors"
    save_safetensors(timm.create_model("sa_resnet_test", num_classes=3).state_dict(), path,
                     metadata={"model": "sa_resnet_test", SANET_MARK: "0", "class_names": "cat,dog,owl"})
    with pytest.raises(sanet.SanetError, match=r"metadata entry 'class_names' is not JSON \('cat,dog,owl'\)"):
        converted_run_metadata(path)
    with pytest.raises(sanet.SanetError, match="is not JSON"):
        load_for_inference(None, pretrained_file=path)


def test_state_dict_is_preferred_to_a_model_entry_that_holds_no_weights():
    """Some training scripts keep their model config under 'model' beside 'state_dict'."""
    weight = torch.ones(2, 2)
    ckpt = {"model": {"name": "sa_resnet_test", "depth": 50}, "state_dict": {"module.fc.weight": weight}}
    assert weights_of(ckpt) == {"fc.weight": weight}
    assert state_dict_from(ckpt, "x.pth") == {"fc.weight": weight}
