"""sanet.analysis on small inputs: FLOP and parameter counts, the model summary `sanet info`
prints, the memory trackers' bookkeeping, and the benchmark helpers' statistics (on a fake
clock: no time is measured)."""
from __future__ import annotations

import io
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import sanet  # noqa: F401  (registers the SA models)
from sanet.analysis import bench as bench_mod
from sanet.analysis import count_flops, model_summary
from sanet.analysis.complexity import sa_elementwise_flops
from sanet.analysis.memory import PeakMemoryTracker
from sanet.layers import ShuffleAttention

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- FLOPs and the summary

def test_count_flops_is_two_per_multiply_add_for_one_image_by_default():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    per_image = 2 * (8 * 8) * 8 * (3 * 3 * 3)  # 2 x output elements x multiply-adds each
    assert count_flops(conv, (3, 8, 8)) == per_image
    assert count_flops(conv, (3, 8, 8), batch_size=3) == 3 * per_image


def test_sa_elementwise_estimate_leaves_no_hooks_behind():
    model = timm.create_model("sa_resnet_test", device="meta")
    first = sa_elementwise_flops(model, (3, 32, 32))
    sa = [m for m in model.modules() if isinstance(m, ShuffleAttention)]
    assert sa and all(not m._forward_hooks for m in sa)
    assert sa_elementwise_flops(model, (3, 32, 32)) == first > 0


def test_model_summary_reports_the_models_own_settings():
    """What `sanet info` prints as the input settings and feature maps, from the model's cfg."""
    model = timm.create_model("sa_resnet50", device="meta")
    cfg = model.pretrained_cfg
    info = model_summary("sa_resnet50")
    assert info["interpolation"] == cfg["interpolation"] == "bilinear"
    assert info["crop_pct"] == cfg["crop_pct"] == 0.875
    assert info["mean"] == list(cfg["mean"]) and info["std"] == list(cfg["std"])
    assert info["mean"] != info["std"]
    assert info["feature_modules"] == [f["module"] for f in model.feature_info] == \
        ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert info["gflops"] == round(info["flops"] / 1e9, 4) and 8.0 < info["gflops"] < 8.5  # 4.1 GMACs
    # sa_resnet_test's cfg differs (crop 1.0, 64 px): read from the model, not fixed values
    small = model_summary("sa_resnet_test")
    assert small["crop_pct"] == 1.0 and small["input_size"] == [3, 64, 64]


# ---------------------------------------------------------------- memory bookkeeping

def test_peak_is_the_largest_sum_not_the_last():
    x = torch.randn(64, 64)
    size = x.numel() * x.element_size()
    with PeakMemoryTracker() as tracker:
        y = x * 2.0
        z = y + 1.0  # 2 tensors alive
        del y, z
        w = x * 3.0  # 1 alive, after the peak
        del w
    assert tracker.peak == 2 * size and tracker.current == 0


def test_peak_counts_a_freed_address_again_when_it_is_reused():
    """The allocator hands a freed block out again: the new tensor is memory in use again."""
    x = torch.randn(64, 64)
    size = x.numel() * x.element_size()
    with PeakMemoryTracker() as tracker:
        for _ in range(4):
            a = x * 2.0
            del a
        y = x * 2.0
        z = y + 1.0
        assert tracker.current == 2 * size
        del y, z
    assert tracker.peak == 2 * size and tracker.current == 0


def test_meta_tensors_take_no_memory():
    x = torch.empty(64, 64, device="meta")
    with PeakMemoryTracker() as tracker:
        y = x * 2.0
        z = y + 1.0
        del y, z
    assert tracker.peak == 0


# ---------------------------------------------------------------- timing statistics

class FakeClock:
    """perf_counter for time_interleaved: each call of a timed function moves it on by the
    next of that function's durations (seconds)."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def perf_counter(self):
        return self.now

    def fn(self, name, durations):
        durations = iter(durations)

        def run():
            self.calls.append(name)
            self.now += next(durations)
        return run


def test_time_interleaved_warms_up_then_reports_median_min_max(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench_mod, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    # 2 warm-up calls (slow: first-call costs), then 3 timed rounds of 1, 5 and 2 seconds
    fns = {"a": clock.fn("a", [100.0, 100.0, 1.0, 5.0, 2.0]), "b": clock.fn("b", [9.0, 9.0, 4.0, 4.0, 4.0])}
    seen = []
    res = bench_mod.time_interleaved(fns, rounds=3, progress=seen.append)
    assert res["a"]["samples_ms"] == [1000.0, 5000.0, 2000.0]
    assert res["a"]["median_ms"] == 2000.0  # the median, not the mean (2667)
    assert (res["a"]["min_ms"], res["a"]["max_ms"], res["a"]["n"]) == (1000.0, 5000.0, 3)
    assert res["b"]["median_ms"] == 4000.0
    assert seen == [0, 1, 2]  # progress after each round


def test_time_interleaved_shuffles_the_order_of_each_round(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench_mod, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    fns = {k: clock.fn(k, [0.001] * 20) for k in "abc"}
    bench_mod.time_interleaved(fns, rounds=8, warmup=0)
    orders = {tuple(clock.calls[i:i + 3]) for i in range(0, 24, 3)}
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)  # each round runs each once
    assert len(orders) > 1  # not always the same order: a drift would favour the first


# ---------------------------------------------------------------- layer_bench's records

def test_max_abs_diff_shows_an_implementation_that_computes_something_else(monkeypatch):
    real = bench_mod.make_sa_layers

    def one_off(*args, **kwargs):
        layers = real(*args, **kwargs)
        with torch.no_grad():
            layers["torch"].cbias.add_(1.0)  # a different function
        return layers

    monkeypatch.setattr(bench_mod, "make_sa_layers", one_off)
    res = bench_mod.layer_bench([2, 16, 4, 4], ["reference", "torch"], rounds=1, groups=4)
    assert res["max_abs_diff"]["reference"] == 0.0  # the first impl is the yardstick
    assert res["max_abs_diff"]["torch"] > 0.01


def test_layer_bench_input_bytes_follow_the_dtype():
    res = bench_mod.layer_bench([2, 16, 4, 4], ["torch"], rounds=1, groups=64, dtype=torch.bfloat16)
    assert res["input_bytes"] == 2 * 16 * 4 * 4 * 2 and res["dtype"] == "bfloat16"
    assert res["groups"] == 8  # 64 groups don't fit 16 channels: the largest that does


# ---------------------------------------------------------------- what a result file records

def test_cpu_model_is_read_from_proc_cpuinfo(monkeypatch):
    text = "processor\t: 0\nvendor_id\t: GenuineX\nmodel\t\t: 85\nmodel name\t: Fancy CPU @ 3.00GHz\n"
    monkeypatch.setattr(bench_mod, "open", lambda *a, **k: io.StringIO(text), raising=False)
    assert bench_mod._cpu_model() == "Fancy CPU @ 3.00GHz"

    def missing(*a, **k):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(bench_mod, "open", missing, raising=False)
    assert bench_mod._cpu_model() is None


def test_git_commit_of_the_checkout_sanet_runs_from():
    if shutil.which("git") is None:
        pytest.skip("no git")

    def git(*argv):
        done = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != REPO.resolve():
        pytest.skip("sanet is not run from a git checkout here")
    found = bench_mod._git_commit()
    assert found["git_commit"] == git("rev-parse", "--short", "HEAD") and found["git_commit"]
    assert found["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no"))
