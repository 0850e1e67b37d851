"""``--amp fp16`` on a CPU runs, but PyTorch's CPU float16 kernels made sa_resnet50 10x slower to
train (benchmarks/amp_cpu.py): ``sanet train`` and ``sanet eval`` say so once, on stderr, and
point to bf16; nothing else warns."""
from __future__ import annotations

import json

import pytest
import torch

from engine_utils import load_ckpt, run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")

_NOTE = "warning: --amp fp16 on the CPU is slow"


@pytest.mark.parametrize("device, amp, warns", [("cpu", "fp16", True), ("cpu", "bf16", False),
                                                ("cpu", "none", False), ("cpu", None, False),
                                                ("cuda", "fp16", False), ("cuda", "bf16", False)])
def test_the_note_is_for_fp16_on_a_cpu_only(device, amp, warns):
    from sanet.engine.evaluate import slow_amp_note

    note = slow_amp_note(torch.device(device), amp)
    assert (note is not None) == warns
    if warns:
        assert "--amp bf16" in note and "docs/benchmarks.md" in note


def test_train_with_fp16_on_the_cpu_warns_once_and_trains(capsys, tmp_path, data):
    code, stdout, err = run_cli(capsys, train_argv(data, tmp_path / "run", "--amp", "fp16", "--device", "cpu"))
    assert code == 0, err
    assert err.count(_NOTE) == 1 and "--amp bf16 is the CPU's mixed precision" in err
    assert "warning" not in stdout  # stdout keeps the run's own lines
    assert load_ckpt(tmp_path / "run" / "last.pt")["scaler"] is not None  # fp16 still scales the loss


@pytest.mark.parametrize("amp", ["fp16", "bf16", "none"])
def test_eval_warns_for_fp16_on_the_cpu_beside_its_json(capsys, trained_run, data, amp):
    code, stdout, err = run_cli(capsys, ["eval", "--checkpoint", str(trained_run / "last.pt"), "--data",
                                         str(data / "val"), "--workers", "0", "--device", "cpu", "--amp", amp,
                                         "--json"])
    assert code == 0, err
    assert json.loads(stdout)["images"] > 0  # the JSON on stdout stays one clean object
    assert err.count(_NOTE) == (amp == "fp16"), err
