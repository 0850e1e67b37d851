"""CLI helpers at unit level: ``sanet train``'s closing lines (with ``fit`` mocked), the
pipe-safe console, strict JSON, and ``sanet ext``'s Triton line."""
from __future__ import annotations

import argparse
import io
import json
import os

import pytest
import torch


def _summary(**changes):
    summary = {"world_size": 1, "best_of": "model", "last_top1": 50.0, "last_top1_ema": None,
               "epochs_trained": 1, "epochs": 3, "seconds": 2.4, "best_top1": 62.5, "best_epoch": 2,
               "last_checkpoint": "o/last.pt", "best_checkpoint": "o/best.pt", "curves": "o/curves.png"}
    summary.update(changes)
    return summary


@pytest.mark.parametrize("changes, first_line", [
    ({}, "done: 1 epoch(s) in 2 s (3 in all); best val top-1 62.50% (epoch 2), last 50.00%"),
    ({"epochs_trained": 3}, "done: 3 epoch(s) in 2 s; best val top-1 62.50% (epoch 2), last 50.00%"),
    ({"epochs_trained": 0}, "nothing trained (3 epoch(s) were done); best val top-1 62.50% (epoch 2), last 50.00%"),
    ({"best_of": "ema", "last_top1_ema": 55.0},
     "done: 1 epoch(s) in 2 s (3 in all); best val top-1 of the EMA 62.50% (epoch 2), last 50.00% (EMA 55.00%)"),
])
def test_train_says_what_it_did(capsys, monkeypatch, changes, first_line):
    import sanet.engine
    from sanet.cli import train

    monkeypatch.setattr(sanet.engine, "fit", lambda args: _summary(**changes))
    assert train.run(argparse.Namespace(model="sa_resnet_test", json=False)) == 0
    assert capsys.readouterr().out.splitlines() == [
        first_line, "checkpoints: o/last.pt, o/best.pt; curves: o/curves.png"]


@pytest.mark.parametrize("rank, world_size, prints", [("0", 2, True), ("1", 2, False), ("2", 4, False)])
def test_only_rank_0_of_a_job_says_what_it_did(capsys, monkeypatch, rank, world_size, prints):
    import sanet.engine
    from sanet.cli import train

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sanet.engine, "fit", lambda args: _summary(world_size=world_size))
    assert train.run(argparse.Namespace(model="sa_resnet_test", json=False)) == 0
    assert bool(capsys.readouterr().out) is prints


def test_a_broken_pipe_is_pointed_at_dev_null_so_the_exit_flush_succeeds():
    """Python's own flush of the real stream at exit must not fail on the closed pipe."""
    from sanet.cli.pipes import _PipeSafe

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    stream = os.fdopen(write_end, "w")
    try:
        safe = _PipeSafe(stream)
        safe.write("lost")
        safe.flush()  # BrokenPipeError inside: swallowed, descriptor now /dev/null
        stream.write("at exit")
        stream.flush()  # raises BrokenPipeError unless the descriptor was redirected
    finally:
        stream.close()


def test_a_broken_console_is_no_longer_a_terminal():
    """After the reader has gone, progress bars (drawn only on a terminal) must stop drawing."""
    from sanet.cli.pipes import _PipeSafe

    class Tty(io.StringIO):
        broken = False

        def isatty(self):
            return True

        def write(self, text):
            if self.broken:
                raise BrokenPipeError
            return super().write(text)

    stream = Tty()
    safe = _PipeSafe(stream)
    assert safe.write("ab") == 2 and safe.isatty() and stream.getvalue() == "ab"
    stream.broken = True
    assert safe.write("cde") == 3  # swallowed, counted as written
    assert not safe.isatty()
    stream.broken = False
    assert safe.write("f") == 1 and stream.getvalue() == "ab"  # nothing reaches it any more


def test_print_json_nulls_non_finite_numbers_in_tuples_too(capsys):
    from sanet.cli.common import print_json

    print_json({"a": (1.5, float("nan")), "b": [float("inf"), {"c": (float("-inf"),)}]})
    out = capsys.readouterr().out
    assert out.endswith("\n") and json.loads(out) == {"a": [1.5, None], "b": [None, {"c": [None]}]}


@pytest.mark.parametrize("cuda, available, text", [
    (False, False, "no CUDA device"),
    (True, False, "unavailable: Triton does not import (CUDA tensors take the PyTorch fallback)"),
    (True, True, "available"),
])
def test_ext_says_why_triton_is_unavailable(monkeypatch, cuda, available, text):
    from sanet.cli.ext import _triton_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert _triton_state(available) == text


@pytest.mark.parametrize("loaded", [True, False])
def test_ext_text_report_and_exit_status(capsys, monkeypatch, loaded):
    import sanet.ops
    import sanet.ops.triton_sa
    from sanet.cli import ext

    status = {"loaded": loaded, "error": None if loaded else "no compiler", "path": "/cache/x.so" if loaded else None,
              "isa": "avx2"}
    monkeypatch.setattr(sanet.ops, "cpu_ext_status", lambda: dict(status))
    monkeypatch.setattr(sanet.ops.triton_sa, "triton_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ext.run(argparse.Namespace(json=False)) == (0 if loaded else 1)
    expected = (["CPU kernels: loaded", "  built in: /cache/x.so"] if loaded else
                ["CPU kernels: unavailable (no compiler)"]) + ["  ISA: avx2", "Triton CUDA kernels: no CUDA device"]
    assert capsys.readouterr().out.splitlines() == expected
    assert ext.run(argparse.Namespace(json=True)) == (0 if loaded else 1)
    assert json.loads(capsys.readouterr().out) == dict(status, triton_cuda=False)
