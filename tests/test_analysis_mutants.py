"""Mutation round for the analysis helpers, `sanet bench`, `sanet info` and `sanet models`:
tests for the mutants of sanet/analysis/{bench,memory,complexity}.py and sanet/cli/{bench,info,
models_cmd}.py that the other tests let through.

Nothing here is timed: the clock, the timing loop and the models are fakes that record what
the benchmark does with them (which mode a forward pass runs in, whether grads were cleared,
when the device is synchronized), and the memory numbers are checked against an independent
measurement of the same work.
"""
from __future__ import annotations

import argparse
import json
import types
import warnings

import pytest
import torch
from torch import nn

import sanet.analysis.bench as bench_mod
from sanet.analysis.memory import PeakMemoryTracker, saved_tensor_bytes
from sanet.cli import bench as cli_bench
from engine_utils import run_cli_args as run_cli
from sanet.layers import ShuffleAttention

MIB = 2 ** 20


def _fake_times(fns):
    one = {"samples_ms": [1.0], "median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "n": 1}
    return {k: dict(one) for k in fns}


# ---------------------------------------------------------------- time_interleaved on a device

def test_the_device_is_synchronized_around_each_timed_call(monkeypatch):
    """CUDA runs asynchronously: the clock starts after earlier work is done and stops after
    the function's kernels are (else it times the launch only)."""
    events = []
    now = [0.0]

    def perf_counter():
        events.append("clock")
        return now[0]

    def fn():
        events.append("fn")
        now[0] += 0.001

    monkeypatch.setattr(bench_mod, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    res = bench_mod.time_interleaved({"a": fn}, rounds=2, warmup=1, device=torch.device("cuda"))
    assert events == ["fn"] + ["sync", "clock", "fn", "sync", "clock"] * 2
    assert res["a"]["samples_ms"] == pytest.approx([1.0, 1.0])


# ---------------------------------------------------------------- what a result file records

def test_machine_info_threads_are_torchs_and_run_info_names_the_timing_variables():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert bench_mod.machine_info(torch.device("cpu"))["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert set(bench_mod.run_info()["env"]) == {"OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LD_PRELOAD"}


def test_git_commit_of_another_repository_is_not_reported(monkeypatch):
    """sanet installed in a venv inside some other project's checkout: git answers with that
    project's top level, whose commit says nothing about sanet."""
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv[3:])
        out = "/somewhere/else\n" if "--show-toplevel" in argv else "abc1234\n"
        return types.SimpleNamespace(returncode=0, stdout=out)

    monkeypatch.setattr(bench_mod.subprocess, "run", fake_run)
    assert bench_mod._git_commit() == {"git_commit": None, "git_dirty": None}
    assert calls == [["rev-parse", "--show-toplevel"]]


# ---------------------------------------------------------------- layer_bench

def test_peak_bytes_is_the_peak_not_what_is_left():
    x = torch.randn(64, 64)
    size = x.numel() * x.element_size()
    assert bench_mod._peak_bytes(lambda: (x * 2.0) + 1.0) == 2 * size  # both alive during the add


def test_sa_layers_follow_the_generator_and_the_dtype():
    def states(seed, dtype=torch.float32):
        layers = bench_mod.make_sa_layers(16, 4, ["reference", "torch"], torch.Generator().manual_seed(seed),
                                          dtype=dtype)
        return [layer.state_dict() for layer in layers.values()]

    a, b, c = states(0), states(0), states(1)
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])  # a seed gives the same parameters again
    assert not torch.equal(a[0]["cweight"], c[0]["cweight"])
    for state in states(0, torch.bfloat16):
        assert {v.dtype for v in state.values()} == {torch.bfloat16}


@pytest.fixture
def captured_layer_bench(monkeypatch):
    """layer_bench with a timing loop that runs each function once and keeps them (and the
    layers it built)."""
    seen = types.SimpleNamespace(fns={}, layers={})
    real = bench_mod.make_sa_layers

    def make_sa_layers(*args, **kwargs):
        seen.layers.update(real(*args, **kwargs))
        return seen.layers

    def fake(fns, rounds, warmup=2, device=None, progress=None):
        seen.fns.update(fns)
        for fn in fns.values():
            fn()
        return _fake_times(fns)

    monkeypatch.setattr(bench_mod, "make_sa_layers", make_sa_layers)
    monkeypatch.setattr(bench_mod, "time_interleaved", fake)
    return seen


def test_layer_bench_times_what_each_row_says(captured_layer_bench):
    fns = captured_layer_bench.fns
    bench_mod.layer_bench([2, 16, 4, 4], ["torch"], rounds=1, groups=4, dtype=torch.bfloat16)
    out = fns["torch/fwd"]()
    # forward alone: no graph is built (and it is not the forward+backward, which returns nothing)
    assert isinstance(out, torch.Tensor) and not out.requires_grad and out.grad_fn is None
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 4, 4)
    assert fns["torch/fwd+bwd"]() is None
    a, b = fns["clone"](), fns["clone"]()  # a copy of the input each call, as the name says
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_layer_bench_memory_is_that_of_a_training_forward_and_backward(captured_layer_bench):
    """saved_bytes: the forward of an input that needs its grad (as in a network); peak: a
    forward+backward whose grads start cleared, as in a training step. Checked against a fresh
    layer measured here (the byte counts depend on the shapes only)."""
    shape = (2, 16, 4, 4)
    res = bench_mod.layer_bench(list(shape), ["torch"], rounds=1, groups=4)
    layer = ShuffleAttention(16, 4, impl="torch")
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    saved = saved_tensor_bytes(lambda: layer(x))["bytes"]
    with PeakMemoryTracker() as tracker:
        layer(x).backward(grad)
    mem = res["memory"]["torch"]
    # each forward+backward starts from cleared grads: the grads are one pass's, not a sum
    bench_layer = captured_layer_bench.layers["torch"]
    once = {n: p.grad.clone() for n, p in bench_layer.named_parameters()}
    captured_layer_bench.fns["torch/fwd+bwd"]()
    for n, p in bench_layer.named_parameters():
        assert torch.allclose(p.grad, once[n]), n
    assert saved_tensor_bytes(lambda: layer(x.detach()))["bytes"] != saved  # the input's grad matters
    assert mem["saved_bytes"] == saved
    assert mem["peak_fwd_bwd_bytes"] == tracker.peak > 0


# ---------------------------------------------------------------- memory accounting

def test_an_excluded_view_excludes_its_whole_storage():
    """exclude matches by storage: a view at an offset (a parameter carved from a flat
    buffer) leaves out the storage it lives in, wherever the saved tensor starts in it."""
    flat = torch.randn(2, 32, requires_grad=True)
    first, second = flat.unbind(0)  # two views; the second starts 128 bytes in
    out = saved_tensor_bytes(lambda: (first * first).sum(), exclude=[second.detach()])
    assert out["bytes"] == 2 * 32 * 4 and out["activation_bytes"] == 0


def test_a_live_storage_returned_again_is_counted_once():
    """unsafe_split returns views without an alias annotation in its schema: the storage is
    already counted (and will be freed once)."""
    x = torch.randn(64, 64)
    with PeakMemoryTracker() as tracker:
        y = x * 2.0
        parts = torch.ops.aten.unsafe_split(y, 16)
        assert tracker.current == y.numel() * y.element_size()
        del parts, y
    assert tracker.peak == x.numel() * x.element_size() and tracker.current == 0


# ---------------------------------------------------------------- model_bench

class Recorder(nn.Module):
    """A tiny model that logs the state each forward pass runs in."""

    def __init__(self, log, num_classes=1000):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, num_classes)
        self.log = log

    def forward(self, x):
        self.log.append({"training": self.training, "grad": torch.is_grad_enabled(),
                         "grads_cleared": all(p.grad is None for p in self.parameters())})
        return self.fc(x.flatten(1))


def test_model_bench_runs_inference_in_eval_and_training_steps_in_full(monkeypatch):
    import timm

    log, models, initial, warmups = [], [], [], []

    def create_model(name, **kwargs):
        m = Recorder(log, **kwargs)
        models.append(m)
        initial.append({k: v.clone() for k, v in m.state_dict().items()})
        return m

    def fake_timing(fns, rounds, warmup=2, device=None, progress=None):
        warmups.append(warmup)
        # inference and training steps alternate (each round's order is shuffled), and the
        # last call leaves the model in eval mode
        for label, model in zip(("a", "b"), models):
            for _ in range(2):
                fns[f"{label}/inference"]()
                before = model.fc.weight.detach().clone()
                fns[f"{label}/train_step"]()
                assert not torch.equal(before, model.fc.weight), "no SGD step"
            fns[f"{label}/inference"]()
        log.append("timed")
        return _fake_times(fns)

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(bench_mod, "time_interleaved", fake_timing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32: no autocast (CPU warns "Disabling autocast" otherwise)
        res = bench_mod.model_bench({"a": {"model": "r"}, "b": {"model": "r"}}, batch_size=2, img_size=4, rounds=1)
    assert warmups and warmups[0] >= 1  # the first call's costs are not timed
    # the same spec, the same seed: both models start from the same weights
    assert all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])
    timed = log.index("timed")
    assert any(not e["grad"] for e in log[:timed]) and any(e["grad"] for e in log[:timed])
    for i, e in enumerate(log):
        if e == "timed":
            continue
        if e["grad"]:  # training steps (grads cleared) and the saved-bytes pass: in train mode
            assert e["training"] and (e["grads_cleared"] or i > timed), (i, e)
        else:  # inference: eval mode
            assert not e["training"], (i, e)
    assert len(log) - timed - 1 == 2 * 2  # after the timing: saved bytes and peak, per model
    fc = models[0].fc
    grads = (fc.weight.numel() + fc.bias.numel()) * 4
    # the step's peak holds the new grads (train_step, not inference, is measured)
    assert res["memory"]["a"]["peak_train_step_bytes"] >= grads


# ---------------------------------------------------------------- the CLI's text

def _model_res():
    times = {}
    for label, (inf, tr) in {"base": (10.0, 20.0), "sa": (30.0, 70.0)}.items():
        times[f"{label}/inference"] = {"samples_ms": [inf], "median_ms": inf}
        times[f"{label}/train_step"] = {"samples_ms": [tr], "median_ms": tr}
    keys = ("saved_bytes", "saved_activation_bytes", "peak_train_step_bytes")
    memory = {"base": dict(zip(keys, (100 * MIB, 40 * MIB, 300 * MIB))),
              "sa": dict(zip(keys, (150 * MIB, 100 * MIB, 600 * MIB)))}
    res = {"batch_size": 2, "img_size": 32, "amp": "torch.bfloat16", "times": times, "memory": memory,
           "dropped": {"sa_fused": "no fused SA kernel"}}
    res["ratios"] = bench_mod.model_ratios(res, "base")
    return res


def test_model_text_cells_each_show_their_own_number():
    lines = cli_bench._model_text(_model_res(), "base")
    assert "autocast bfloat16" in lines[0] and "torch." not in lines[0]
    assert lines[3].split() == ["sa", "30.0", "3.000", "70.0", "3.500", "150.0", "1.500", "100.0", "2.500",
                                "600.0", "2.000"]
    assert lines[-1] == "  (sa_fused: not run: no fused SA kernel)"


def test_layer_text_shows_the_clone_median_and_mebibytes():
    times = {"clone": {"samples_ms": [1.0, 3.0, 9.0], "median_ms": 3.0, "min_ms": 1.0}}
    for name, ms in (("torch/fwd", 6.0), ("torch/fwd+bwd", 12.0)):
        times[name] = {"samples_ms": [ms] * 3, "median_ms": ms}
    res = {"shape": [2, 8, 4, 4], "groups": 4, "dtype": "float32", "times": times,
           "memory": {"torch": {"saved_bytes": 100 * MIB, "peak_fwd_bwd_bytes": 300 * MIB}}}
    res["ratios"] = cli_bench.layer_ratios(res)
    lines = cli_bench._layer_text(res)
    assert "x.clone(): 3.000 ms" in lines[0]
    assert lines[-1].split()[-2:] == ["100.0", "300.0"]


# ---------------------------------------------------------------- run()'s records and header

TINY = ("--skip-layers", "--model", "sa_resnet_test", "--baseline", "resnet18", "--batch-size", "2",
        "--img-size", "32")

def test_json_names_the_baseline_and_a_pretrained_tag_is_an_sa_model(capsys, fake_bench):
    code, out, err = run_cli(capsys, "bench", "--json", *TINY)
    assert code == 0, err
    res = json.loads(out)
    assert res["models"]["baseline"] == "resnet18"
    assert not any(k.startswith("_") for k in res["args"])
    cli_bench._check_models(argparse.Namespace(model="sa_resnet50.authors_in1k", baseline="resnet18",
                                               batch_size=2, img_size=32))


def test_progress_bars_are_off_with_json(capsys, fake_bench, monkeypatch):
    import tqdm

    disabled = []

    class Bar:
        def __init__(self, *args, disable=None, **kwargs):
            disabled.append(disable)

        def update(self, *a):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    assert run_cli(capsys, "bench", "--json", *TINY)[0] == 0
    assert run_cli(capsys, "bench", *TINY)[0] == 0
    assert disabled == [True, None]  # None: tqdm decides (draws on a terminal only)


def test_text_header_names_the_cpu_and_torch_threads(capsys, fake_bench, monkeypatch):
    info = {"cpu_model": "Fancy CPU", "processor": "x86_64", "cpu_count": 64, "threads": 3,
            "cpu_capability": "AVX2", "torch": "9", "device": "cpu"}
    monkeypatch.setattr(bench_mod, "machine_info", lambda device: dict(info))
    code, out, err = run_cli(capsys, "bench", *TINY)
    assert code == 0, err
    assert out.splitlines()[0].startswith("Fancy CPU, 64 CPUs, 3 torch threads, AVX2, torch 9, device cpu")
    info["cpu_model"] = None  # no /proc/cpuinfo: the platform's processor
    assert run_cli(capsys, "bench", *TINY)[1].startswith("x86_64, 64 CPUs")


# ---------------------------------------------------------------- complexity, info and models

def test_info_and_models_build_their_models_on_the_meta_device(monkeypatch):
    """Counting needs shapes only: sa_resnet152 must not allocate its 66 M parameters."""
    import timm

    from sanet.analysis import model_summary
    from sanet.cli.models_cmd import family_table

    real, devices = timm.create_model, []

    def create_model(name, **kwargs):
        devices.append(kwargs.get("device"))
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    model_summary("sa_resnet_test")
    rows = family_table()
    assert len(devices) == 1 + len(rows) and set(devices) == {"meta"}


def test_count_flops_works_on_a_model_that_cannot_run_one_image_in_training_mode():
    """BatchNorm after pooling needs two values per channel in training mode: FLOPs are
    counted in eval mode, and the mode is put back."""
    from sanet.analysis import count_flops

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)).train()
    assert count_flops(model, (3, 2, 2)) == 2 * 12 * 4
    assert model.training
