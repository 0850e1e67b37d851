"""`sanet bench` and the benchmark helpers: like-for-like layers, what the JSON records, the
fused row only where a fused kernel runs, and clean errors instead of tracebacks.

Everything runs on tiny shapes with one or two timing rounds; no number is judged.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sanet.analysis import bench as bench_mod
from sanet.analysis.bench import layer_bench, make_sa_layers, paired_ratio, time_interleaved
from sanet.cli import main
from sanet.cli.bench import _model_text

from conftest import fused_kernel_available

REPO = Path(__file__).resolve().parents[1]
# A small SA model against a small plain one: a model table in about a second.
TINY_MODELS = ("--model", "sa_resnet_test", "--baseline", "resnet18", "--batch-size", "2",
               "--img-size", "32", "--model-rounds", "1", "--threads", "1")


def run_cli(capsys, *argv: str):
    """(exit code, stdout, stderr) of ``sanet argv...`` run in-process."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _impls():
    return ["reference", "torch"] + (["fused"] if fused_kernel_available() else [])


# ---------------------------------------------------------------- layers compare like for like

def test_layers_share_one_set_of_parameters():
    layers = make_sa_layers(16, 4, _impls(), torch.Generator().manual_seed(0))
    states = [layer.state_dict() for layer in layers.values()]
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        for k in state:
            assert torch.equal(state[k], states[0][k]), k
    # random, not the initial values (cweight starts at 0): the gates do work
    assert states[0]["cweight"].abs().sum() > 0


def test_layer_bench_implementations_compute_the_same_outputs():
    res = layer_bench([2, 16, 4, 4], _impls(), rounds=1, groups=4)
    assert set(res["max_abs_diff"]) == set(_impls())
    # Each impl once drew its own parameters: differences were O(1).
    for impl, diff in res["max_abs_diff"].items():
        assert diff < 1e-5, (impl, diff)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """time(a) / time(b) round by round, then the median: a slow round slows both variants."""
    times = {"a": {"samples_ms": [2.0, 4.0, 6.0]}, "b": {"samples_ms": [1.0, 1.0, 2.0]}}
    assert paired_ratio(times, "a", "b") == 3.0  # median of 2, 4, 3 (the ratio of medians is 4)
    assert paired_ratio(times, "b", "a") == pytest.approx(1 / 3)


def test_layer_ratios_are_speed_ups_over_the_reference():
    """fwd_x_ref and fwd_bwd_x_ref alike: reference time / impl time (above 1: faster)."""
    from sanet.cli.bench import layer_ratios

    ms = {"clone": 1.0, "reference/fwd": 2.0, "fused/fwd": 1.0, "reference/fwd+bwd": 8.0, "fused/fwd+bwd": 2.0}
    res = {"times": {k: {"samples_ms": [v]} for k, v in ms.items()}, "memory": {"reference": {}, "fused": {}}}
    r = layer_ratios(res)
    assert r["fused"] == {"fwd_x_ref": 2.0, "fwd_bwd_x_ref": 4.0, "fwd_over_clone": 1.0}
    assert r["reference"] == {"fwd_x_ref": 1.0, "fwd_bwd_x_ref": 1.0, "fwd_over_clone": 2.0}


def test_model_ratios_are_model_over_baseline_each_of_its_own_field():
    """Every field a different ratio (and none the inverse of another): a field read from the
    wrong number, or divided the wrong way, shows."""
    from sanet.analysis.bench import model_ratios

    ms = {"base/inference": 1.0, "base/train_step": 2.0, "sa/inference": 4.0, "sa/train_step": 10.0}
    mem = {"base": {"saved_bytes": 100, "saved_activation_bytes": 50, "peak_train_step_bytes": 200},
           "sa": {"saved_bytes": 150, "saved_activation_bytes": 100, "peak_train_step_bytes": 600}}
    r = model_ratios({"times": {k: {"samples_ms": [v]} for k, v in ms.items()}, "memory": mem}, "base")
    assert r["sa"] == {"inference": 4.0, "train_step": 5.0, "saved": 1.5, "saved_activations": 2.0, "peak": 3.0}
    assert r["base"] == dict.fromkeys(r["sa"], 1.0)


def test_model_bench_activation_bytes_leave_out_parameters_and_buffers():
    """BatchNorm in training saves its running statistics: buffers of the model, not
    activations the forward pass made."""
    import timm
    from torch import nn

    from sanet.analysis.bench import model_bench
    from sanet.analysis.memory import saved_tensor_bytes

    res = model_bench({"m": {"model": "sa_resnet_test"}}, batch_size=2, img_size=32, rounds=1)
    model = timm.create_model("sa_resnet_test", num_classes=1000).train()
    x, target = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)

    def loss():
        return nn.CrossEntropyLoss()(model(x), target)

    params = list(model.parameters())
    both = saved_tensor_bytes(loss, exclude=[*params, *model.buffers()])["activation_bytes"]
    assert saved_tensor_bytes(loss, exclude=params)["activation_bytes"] > both  # BN buffers are saved
    assert res["memory"]["m"]["saved_activation_bytes"] == both


def test_zero_rounds_is_a_value_error():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_interleaved({"a": lambda: None}, rounds=0)


# ---------------------------------------------------------------- the CLI's JSON

def test_json_holds_the_ratios_the_text_prints_and_run_details(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    code, out, _ = run_cli(capsys, "bench", "--json", "--shapes", "2x16x4x4", "--rounds", "2",
                           "--output", str(out_file), *TINY_MODELS)
    assert code == 0
    res = json.loads(out)
    assert json.loads(out_file.read_text()) == res
    assert res["args"]["rounds"] == 2 and res["args"]["model"] == "sa_resnet_test"
    assert res["args"]["output"] == str(out_file)
    run = res["run"]
    assert {"sanet", "timm", "torch", "git_commit", "git_dirty", "env"} <= set(run)
    assert "OMP_WAIT_POLICY" in run["env"]
    assert "cpu_model" in res["machine"]
    layer = res["layers"][0]
    t = layer["times"]
    for impl, r in layer["ratios"].items():
        assert r["fwd_over_clone"] == paired_ratio(t, f"{impl}/fwd", "clone")
        assert r["fwd_x_ref"] == paired_ratio(t, "reference/fwd", f"{impl}/fwd")
    models = res["models"]
    mem, ratios = models["memory"], models["ratios"]
    assert set(ratios) == set(mem)
    r = ratios["sa_resnet_test[reference]"]
    assert r["train_step"] == paired_ratio(models["times"], "sa_resnet_test[reference]/train_step",
                                           "resnet18/train_step")
    for label, m in mem.items():
        # activations only: the weights the convolutions save are left out
        assert 0 < m["saved_activation_bytes"] < m["saved_bytes"]
        assert ratios[label]["saved_activations"] == m["saved_activation_bytes"] / mem["resnet18"]["saved_activation_bytes"]
    # the text table prints these very numbers
    text = "\n".join(_model_text(models, "resnet18"))
    assert f"{r['inference']:.3f}" in text and f"{r['saved_activations']:.3f}" in text


def test_git_commit_never_fails(monkeypatch):
    def broken(*_a, **_k):
        raise OSError("no git here")

    monkeypatch.setattr(bench_mod.subprocess, "run", broken)
    assert bench_mod._git_commit() == {"git_commit": None, "git_dirty": None}


# ---------------------------------------------------------------- no fused row where none runs

def test_cpu_bf16_drops_the_fused_model_row_and_says_why(capsys, no_cpu_kernel):
    code, out, err = run_cli(capsys, "bench", "--json", "--dtype", "bf16", "--skip-layers", *TINY_MODELS)
    assert code == 0
    res = json.loads(out)
    models = res["models"]
    # sa_impl="auto" would have run the authors' formulation under the fused default's name
    assert "sa_resnet_test" not in models["memory"]
    assert "sa_resnet_test[reference]" in models["memory"] and "resnet18" in models["memory"]
    assert "authors' formulation" in models["dropped"]["sa_resnet_test"]
    assert res["fused_kernel_available"] is False
    assert "without the fused sa_resnet_test row" in err
    assert "layers timed" not in err  # --skip-layers: no note about layers


def test_only_the_fused_impl_where_none_runs_is_refused(capsys, no_cpu_kernel):
    # it timed x.clone() alone and exited 0
    code, _, err = run_cli(capsys, "bench", "--dtype", "bf16", "--impls", "fused", "--shapes", "2x8x4x4",
                           "--rounds", "1", "--skip-models")
    assert code == 2 and "--impls fused: no fused SA kernel for cpu bfloat16" in err and "--skip-layers" in err


@pytest.mark.skipif(not fused_kernel_available(), reason="no CPU fused kernel: no fused row at all")
def test_fp32_keeps_the_fused_row_and_prints_no_fallback_note(capsys):
    code, out, err = run_cli(capsys, "bench", "--json", "--skip-layers", *TINY_MODELS)
    assert code == 0
    res = json.loads(out)
    assert "sa_resnet_test" in res["models"]["memory"] and res["models"]["dropped"] == {}
    assert res["notes"] == [] and "no fused" not in err


# ---------------------------------------------------------------- errors, not tracebacks

@pytest.mark.parametrize("flag", ["--rounds", "--model-rounds", "--batch-size", "--img-size"])
def test_zero_is_a_usage_error(capsys, flag):
    code, _, err = run_cli(capsys, "bench", flag, "0")
    assert code == 2 and f"argument {flag}: must be >= 1, got 0" in err


def test_unknown_impl_is_a_usage_error_naming_the_valid_ones(capsys):
    code, _, err = run_cli(capsys, "bench", "--impls", "refrence", "--skip-models")
    assert code == 2 and "argument --impls: invalid choice: 'refrence'" in err and "'fused'" in err


def test_cuda_without_a_device_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, "bench", "--device", "cuda", "--skip-layers")
    assert code == 2 and "no CUDA device is available" in err and "Traceback" not in err


def test_non_sa_model_is_refused_with_the_sa_models(capsys):
    code, _, err = run_cli(capsys, "bench", "--model", "resnet18", "--skip-layers")
    assert code == 2 and "'resnet18' is not an SA model" in err and "sa_resnet50" in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_profile_without_cuda_exits_2(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_profile.py"), "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "no CUDA device is available" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "p").exists()


def test_attention_modules_script_leaves_out_the_fused_row_without_a_kernel(tmp_path):
    """With impl="auto" and no kernel, the 'sa (fused)' row would time the authors' formulation
    under the fused name."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SANET_DISABLE_EXT": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention_modules.py"), "--json",
                           "--rounds", "1", "--batch-size", "2", "--img-size", "32", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(done.stdout)
    assert "sa (fused)" not in res["memory"] and "sa (reference)" in res["memory"]
    assert res["fused_kernel_available"] is False and "left out" in res["notes"][0]
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention_modules.py"), "--threads", "0"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "--threads: must be >= 1, got 0" in done.stderr
    # refused before the timing (a traceback at the end, results lost, before)
    (tmp_path / "file.json").write_text("")
    for argv, said in ((["--batch-size", "1", "--img-size", "32"], "leaves one value per channel"),
                       (["--output", str(tmp_path / "file.json" / "x.json")], "is not a writable folder")):
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention_modules.py"), *argv],
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr


def test_layer_call_path_script_times_each_path_and_checks_its_shapes():
    if not fused_kernel_available():
        pytest.skip("the script times the fused CPU kernel")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "benchmarks" / "layer_call_path.py")
    done = subprocess.run([sys.executable, script, "--json", "--rounds", "2", "--threads", "1", "--shapes", "2x64x5x5",
                           "--groups", "8"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    (layer,) = json.loads(done.stdout)["layers"]
    assert layer["shape"] == [2, 64, 5, 5]
    assert set(layer["times"]) == {"short", "general", "kernel", "reference", "clone"}
    assert all(r > 0 for r in layer["ratios"].values())
    for argv, said in ((["--shapes", "2x64"], "3 to 5 positive dims"), (["--shapes", "2x64xfive"], "bad shape"),
                       (["--shapes", "2x64x5x5", "--groups", "64"], "valid --groups: [1, 2, 4, 8, 16, 32]")):
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------- benchmarks/gpu_check.sh's exit status

def _fake_python(tmp_path: Path, cuda: bool) -> Path:
    """A "python" for gpu_check.sh: answers its CUDA probe, fails every other command."""
    script = tmp_path / "fakepy"
    script.write_text("#!/bin/sh\ncase \"$*\" in *cuda.is_available*) exit %d;; esac\nexit 1\n" % (0 if cuda else 1))
    script.chmod(0o755)
    return script


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
@pytest.mark.parametrize("cuda, status", [(False, 2), (True, 1)])
def test_gpu_check_exit_status(tmp_path, cuda, status):
    env = {**os.environ, "PYTHON": str(_fake_python(tmp_path, cuda)), "OUT": str(tmp_path / "out"),
           "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stdout + done.stderr
    if cuda:  # every step ran and failed: reported, and the work folder is gone
        assert "SOME STEP FAILED" in done.stdout
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp.")]
    else:
        assert "no CUDA device" in done.stderr and "== environment" not in done.stdout
