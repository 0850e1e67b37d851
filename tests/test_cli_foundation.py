"""The `sanet` command: help for every subcommand, `models`, `info`, `ext`, entry points.

Most tests call ``sanet.cli.main`` in-process (fast); one runs the installed console
script and ``python -m sanet`` as a user would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import sanet
from sanet.analysis import count_flops
from sanet.cli import COMMANDS, main

from conftest import fused_kernel_available


def run_cli(capsys, *argv: str):
    """(exit code, stdout, stderr) of ``sanet argv...`` run in-process."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "usage: sanet" in out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert f"usage: sanet {command}" in out and "-h, --help" in out
    assert len(out.splitlines()) >= 4, "help should describe the command"


def test_version_and_missing_command(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"sanet {sanet.__version__}"
    code, _, err = run_cli(capsys)
    assert code == 2 and "COMMAND" in err


def test_models_json_lists_the_family(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)}
    assert set(rows) == set(sanet.SA_MODELS)
    for name, row in rows.items():
        model = timm.create_model(name, device="meta")
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["input_size"] == list(model.pretrained_cfg["input_size"])
    assert rows["sa_resnet50"]["params"] == 25_557_740 and rows["sa_resnet50"]["sa_params"] == 708
    assert rows["sa_resnet50"]["authors_weights"] and rows["sa_resnet101"]["authors_weights"]
    assert not rows["sa_resnet152"]["authors_weights"]


def test_models_table(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    for name in sanet.SA_MODELS:
        assert name in out
    assert "25,557,740" in out and "3x224x224" in out
    assert "708" in out and "300" in out  # the released code's SA count vs the abstract's


def test_info_json_sa_resnet50(capsys):
    code, out, _ = run_cli(capsys, "info", "sa_resnet50", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["model"] == "sa_resnet50"
    assert info["params"] == 25_557_740 and info["sa_params"] == 708
    assert info["flops"] > 0 and info["macs"] == info["flops"] // 2
    assert "FlopCounterMode" in info["flop_counter"]
    assert info["input_size"] == [3, 224, 224]
    assert info["feature_channels"] == [64, 256, 512, 1024, 2048]
    assert info["feature_strides"] == [2, 4, 8, 16, 32]
    assert "474p" in info["weights"]
    # The named counter sees convolutions and matmuls only: SA adds nothing to the count.
    plain = timm.create_model("resnet50", device="meta")
    assert info["flops"] == count_flops(plain, (3, 224, 224))


def test_info_text_and_options(capsys):
    code, out, _ = run_cli(capsys, "info", "sa_resnet_test", "--num-classes", "10")
    assert code == 0
    model = timm.create_model("sa_resnet_test", num_classes=10, device="meta")
    assert f"{sum(p.numel() for p in model.parameters()):,}" in out
    assert "counter: torch.utils.flop_counter.FlopCounterMode" in out
    assert "no pretrained weights exist" in out
    info = json.loads(run_cli(capsys, "info", "sa_resnet_test", "--num-classes", "10", "--json")[1])
    assert f"MACs / FLOPs:    {info['macs'] / 1e9:.3f} G / {info['flops'] / 1e9:.3f} G" in out  # the text's numbers
    code, _, err = run_cli(capsys, "info", "sa_resnet_test", "--num-classes", "-3")
    assert code == 2 and "--num-classes must be 0 (no classifier) or more, got -3" in err
    code, out, err = run_cli(capsys, "info", "sa_resnet_test", "--num-classes", "0", "--json")  # headless
    headless = timm.create_model("sa_resnet_test", num_classes=0, device="meta")
    assert code == 0, err
    assert json.loads(out)["num_classes"] == 0
    assert json.loads(out)["params"] == sum(p.numel() for p in headless.parameters())


def test_count_flops_leaves_the_model_in_its_mode():
    for training in (True, False):
        model = timm.create_model("sa_resnet_test", device="meta").train(training)
        count_flops(model, (3, 32, 32))
        assert model.training is training
        assert all(m.training is training for m in model.modules())


def test_sa_elementwise_estimate_is_10_flops_per_gated_element():
    """The estimate info prints: ~10 FLOPs per element each SA layer gates, for one image."""
    from sanet.analysis import model_summary
    from sanet.layers import ShuffleAttention

    model = timm.create_model("sa_resnet_test", device="meta").eval()
    sizes = []
    handles = [m.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].numel()))
               for m in model.modules() if isinstance(m, ShuffleAttention)]
    model(torch.zeros(1, *model.pretrained_cfg["input_size"], device="meta"))
    for h in handles:
        h.remove()
    assert len(sizes) > 1
    assert model_summary("sa_resnet_test")["sa_elementwise_flops_estimate"] == 10 * sum(sizes)


def test_json_errors_come_from_rank_0_only(capsys, monkeypatch):
    """Under torchrun every process fails alike; stdout gets one JSON object per job."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, out, err = run_cli(capsys, "info", "nope", "--json")
    assert code == 2 and out == "" and "unknown model 'nope'" in err
    monkeypatch.setenv("RANK", "0")
    code, out, _ = run_cli(capsys, "info", "nope", "--json")
    assert code == 2 and json.loads(out)["command"] == "info"
    assert json.loads(out)["error"].startswith("unknown model 'nope'")


def test_top_level_usage_error_names_the_subcommand_after_an_option(capsys):
    """`sanet --model X info --json`: the top parser refuses --model before the subcommand;
    the JSON still names the command that was asked for."""
    code, out, _ = run_cli(capsys, "--model", "sa_resnet_test", "info", "--json")
    assert code == 2 and json.loads(out)["command"] == "info"


@pytest.mark.parametrize("argv", [("info", "sa_resnet5O"), ("info", "nope", "--json"),
                                  ("convert", "a.pth", "b.safetensors", "--model", "nope")])
def test_unknown_model_is_exit_code_2_with_a_message(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    message = f"unknown model {argv[1] if argv[0] == 'info' else 'nope'!r}"
    assert code == 2 and message in err
    if "--json" in argv:  # stdout holds the error as one JSON object
        assert json.loads(out)["error"].startswith(message)
    else:
        assert out == ""
    assert "sa_resnet50" in err  # lists the family
    assert "Traceback" not in err


def test_ext_reports_the_kernels(capsys):
    code, out, _ = run_cli(capsys, "ext", "--json")
    status = json.loads(out)
    assert status["loaded"] == fused_kernel_available()
    assert code == (0 if status["loaded"] else 1)
    assert "isa" in status and "triton_cuda" in status


def test_ext_reports_a_failed_build_once(tmp_path):
    """No compiler: `sanet ext` says why in its report, without the library's warning too."""
    env = {k: v for k, v in os.environ.items() if k not in ("SANET_REQUIRE_EXT", "SANET_DISABLE_EXT")}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), CXX="/bin/false", SANET_EXT_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "sanet", "ext"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.startswith("CPU kernels: unavailable (")
    assert "/bin/false" in proc.stdout
    assert "could not be built" not in proc.stderr and "Traceback" not in proc.stderr


def test_extension_is_built_from_a_copy_in_its_cache_dir():
    """Installs at other paths (a checkout, site-packages) share one build instead of
    rebuilding in turn: cpp_extension rebuilds when the source path in build.ninja changes."""
    from sanet.ops.cpu_ext import _FILES, _SRC, cpu_ext_status

    status = cpu_ext_status()
    if not status["loaded"]:
        pytest.skip("fused CPU kernel unavailable")
    build = Path(status["path"])
    assert len(_FILES) > 1  # the .cpp and the headers it includes
    for path in _FILES:
        assert (build / path.name).read_bytes() == path.read_bytes(), path.name
    ninja = (build / "build.ninja").read_text()
    assert str(build / _SRC.name) in ninja and str(_SRC) not in ninja


def test_extension_builds_and_is_exact_for_avx2(tmp_path):
    """Machines without AVX-512 get the AVX2 build (ATen picks the ISA at run time): build it
    here too, in a fresh cache, and run the kernel tests that probe its own code (the
    vector sigmoid and sums, the 16-bit loads and stores) against the reference and fp64:
    NaN, saturated gates, large means, the fp32 cases of every layout, fp16/bf16 bitwise
    against the fp32 kernel rounded once."""
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this machine's own build is already the AVX2 (or another) one")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), ATEN_CPU_CAPABILITY="avx2",
               SANET_EXT_DIR=str(tmp_path), SANET_REQUIRE_EXT="1")
    isa = "from sanet.ops import cpu_ext_status; st = cpu_ext_status(); print(st['loaded'], st['isa'])"
    proc = subprocess.run([sys.executable, "-c", isa], capture_output=True, text=True, env=env, timeout=600)
    assert proc.stdout.split() == ["True", "AVX2"], proc.stderr[-3000:]
    here = Path(__file__).parent
    tests = [str(here / "test_fused.py"), str(here / "test_fused_precision.py"), str(here / "test_cpu_half.py")]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k",
         "nan_reaches or inf_in or identity_planes or outlier_plane or saturated or large_mean or large_planes "
         "or matches_reference_fp32 or bn_sa_fusion or half_precision_on_cpu "
         "or (native_half and (3x3 or 5x13 or 56x56)) or channels_last_half"],
        capture_output=True, text=True, env=env, timeout=900, cwd=here)
    assert proc.returncode == 0 and " passed" in proc.stdout.splitlines()[-1], proc.stdout[-3000:]


def test_console_script_and_python_m(tmp_path):
    """The installed entry points, as a user runs them (one subprocess each)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    script = Path(sys.executable).with_name("sanet")
    for argv in ([str(script), "--help"], [sys.executable, "-m", "sanet", "--help"]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage: sanet" in proc.stdout and "models" in proc.stdout


def test_info_accepts_pretrained_tags_and_other_timm_models(capsys):
    code, out, _ = run_cli(capsys, "info", "sa_resnet50.authors_in1k", "--json")
    assert code == 0 and json.loads(out)["params"] == 25_557_740 and "474p" in json.loads(out)["weights"]
    code, out, _ = run_cli(capsys, "info", "resnet18", "--json")
    info = json.loads(out)
    assert code == 0 and info["sa_params"] == 0 and "weights" not in info


@pytest.mark.parametrize("argv", [("info", "sa_resnet50.foo", "--json"),
                                  ("convert", "a.pth", "b.safetensors", "--model", "sa_resnet50.foo")])
def test_unknown_pretrained_tag_names_the_valid_ones(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and "sa_resnet50 has no pretrained tag 'foo'" in err and "sa_resnet50.authors_in1k" in err
    assert "Traceback" not in err
    if "--json" in argv:
        assert json.loads(out)["command"] == "info"
    code, _, err = run_cli(capsys, "info", "sa_resnet_test.x")
    assert code == 2 and "sa_resnet_test has no pretrained tag 'x'; it has none: use sa_resnet_test" in err


def test_package_data_ships_every_kernel_source():
    """A wheel (non-editable install) holds only what package-data names: every file in
    csrc/ (the .cpp and the headers it includes) must match one of its globs."""
    import fnmatch
    import tomllib

    from sanet.ops.cpu_ext import _CSRC, _FILES

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["sanet.ops"]
    for path in _CSRC.iterdir():
        rel = f"csrc/{path.name}"
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in package-data {globs}"
    assert set(_FILES) == {p for p in _CSRC.iterdir() if p.suffix in (".cpp", ".h")}
