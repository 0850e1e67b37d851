"""Gaps found by mutation testing of ``sanet eval`` / ``sanet predict`` and their engine:
throughput summed over ranks, the documented argument defaults, and the --amp hint that
comes with a report of non-finite outputs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine_utils import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


class _Timed(nn.Module):
    """Returns its input as logits, moving a fake clock: 10 s for the first call, 1 s after."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def forward(self, x):
        self.clock["calls"] += 1
        self.clock["t"] += 10.0 if self.clock["calls"] == 1 else 1.0
        return x


@pytest.mark.parametrize("ranks", [2, 3])
def test_throughput_is_the_whole_jobs(monkeypatch, ranks):
    """Under torchrun each rank times its own shard; the reported rate is the job's: this
    rank's rate scaled by all images over this rank's images."""
    import sanet.engine.evaluate as evaluate_mod
    from sanet.engine.distributed import DistContext

    clock = {"t": 0.0, "calls": 0}
    monkeypatch.setattr(evaluate_mod, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    # the other ranks evaluated shards just like this one: the sums grow by that factor
    monkeypatch.setattr(evaluate_mod, "all_reduce_sum", lambda sums, ctx: sums.mul_(ranks))
    logits, targets = torch.randn(12, 5), torch.randint(0, 5, (12,))
    loader = [(logits[i:i + 4], targets[i:i + 4], 0) for i in (0, 4, 8)]
    r = evaluate_mod.evaluate(_Timed(clock), loader, DistContext())
    assert r["images"] == 12 * ranks
    assert r["images_per_s"] == pytest.approx(ranks * 8 / 2.0)  # 8 images in 2 s after the first batch, per rank


def test_documented_defaults():
    from sanet.cli import build_parser

    parser = build_parser()
    ev = parser.parse_args(["eval", "--checkpoint", "c.pt", "--data", "d"])
    assert (ev.batch_size, ev.amp, ev.device, ev.img_size, ev.crop_pct) == (64, "none", "auto", None, None)
    assert not (ev.json or ev.ema or ev.channels_last or ev.skip_bad_images or ev.no_progress)
    pr = parser.parse_args(["predict", "--checkpoint", "c.pt", "x.png"])
    assert (pr.topk, pr.batch_size, pr.device) == (5, 32, "auto")
    assert not (pr.json or pr.ema or pr.skip_bad_images)
    for flag in ("--topk", "--top-k", "-k"):
        assert parser.parse_args(["predict", "--checkpoint", "c.pt", flag, "2", "x.png"]).topk == 2


@pytest.mark.parametrize("amp,hint", [
    ("fp16", " under --amp fp16 (try --amp bf16 or none)"),
    ("bf16", " under --amp bf16 (try --amp none)"),
    ("none", ""),
])
def test_non_finite_outputs_name_the_amp_setting(capsys, monkeypatch, trained_run, data, amp, hint):
    """fp16 overflows where fp32 does not: the report says which precision to try instead."""
    import sanet.engine.evaluate as evaluate_mod

    seen = {}

    def nonfinite(model, loader, ctx, **kw):
        seen.update(kw)
        return {"top1": 0.0, "top5": 0.0, "loss": float("nan"), "images": 12, "skipped": 0,
                "nonfinite": 5, "seconds": 1.0, "images_per_s": 12.0}

    monkeypatch.setattr(evaluate_mod, "evaluate", nonfinite)
    code, out, err = run_cli(capsys, ["eval", "--checkpoint", str(trained_run / "last.pt"), "--data",
                                      str(data / "val"), "--workers", "0", "--amp", amp, "--json"])
    assert seen["amp"] == amp and code == 2
    error = json.loads(out)["error"]
    assert "NaN or inf for 5 of 12 images" in error
    assert error.endswith("overflow" + hint), error


def _eval_argv(*flags):
    return ["eval", "--checkpoint", "x.pt", "--data", "d", *flags]


def test_debug_keeps_the_traceback_of_an_error_after_ctrl_c(capsys, monkeypatch, sigint_default):
    import os
    import signal

    import sanet.cli.evaluate as cli_eval

    def interrupted_then_failed(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass  # dropped, as in a finalizer
        raise RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly")

    monkeypatch.setattr(cli_eval, "run", interrupted_then_failed)
    assert run_cli(capsys, _eval_argv())[0] == 130
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        run_cli(capsys, _eval_argv("--debug"))


def test_debug_keeps_the_traceback_of_a_user_error(capsys, monkeypatch):
    import sanet.cli.evaluate as cli_eval

    def bad(args):
        raise ValueError("--something is wrong")

    monkeypatch.setattr(cli_eval, "run", bad)
    code, out, err = run_cli(capsys, _eval_argv("--json"))
    assert code == 2 and err == "sanet eval: error: --something is wrong\n"
    assert json.loads(out) == {"error": "--something is wrong", "command": "eval"}
    with pytest.raises(ValueError, match="--something is wrong"):
        run_cli(capsys, _eval_argv("--debug"))


def test_a_closed_pipe_is_not_an_error(monkeypatch):
    import io
    import sys

    import sanet.cli.evaluate as cli_eval
    from sanet.cli import main

    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli_eval, "run", reader_gone)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(_eval_argv()) == 0
    assert stderr.closed  # nothing more (Python's own "Exception ignored ... BrokenPipeError") is written


@pytest.mark.parametrize("flag", ["--topk", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_predict_refuses_counts_below_one_before_loading(capsys, flag, value):
    code, out, err = run_cli(capsys, ["predict", "--checkpoint", "missing.pt", flag, value, "--json", "x.png"])
    assert code == 2 and f"{flag} must be at least 1, got {value}" in err
    assert json.loads(out)["command"] == "predict"


@pytest.mark.parametrize("skipped", [0, 3])
def test_eval_text_says_how_many_images_were_skipped(capsys, monkeypatch, trained_run, data, skipped):
    import sanet.engine.evaluate as evaluate_mod

    metrics = {"top1": 50.0, "top5": 100.0, "loss": 0.5, "images": 9, "skipped": skipped, "nonfinite": 0,
               "seconds": 1.0, "images_per_s": 9.0}
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **kw: metrics)
    code, out, _ = run_cli(capsys, ["eval", "--checkpoint", str(trained_run / "last.pt"), "--data",
                                    str(data / "val"), "--workers", "0"])
    assert code == 0 and "top-1 50.00%  top-5 100.00%  loss 0.5000  9 images" in out
    assert ("(3 unreadable skipped)" in out) == bool(skipped)
