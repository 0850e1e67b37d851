"""`sanet bench`'s own logic without timing anything: its checks of shapes, sizes and paths,
the rows and options it hands the model benchmark (a fake records them), the text table's
cells, and model_bench's records."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sanet.analysis.bench as bench_mod
from engine_utils import run_cli_args as run_cli
from sanet.cli import bench as cli_bench


# ---------------------------------------------------------------- checks before any timing

@pytest.mark.parametrize("shape, said", [("2x8", "3 to 5 positive dims"), ("2x8x4x4x4x4", "3 to 5 positive dims"),
                                         ("2x0x4x4", "3 to 5 positive dims"), ("0x8x4x4", "3 to 5 positive dims"),
                                         ("2x8xfour", "expected e.g. 8x256x56x56")])
def test_bad_shapes_are_refused_before_timing(capsys, monkeypatch, shape, said):
    monkeypatch.setattr(bench_mod, "time_interleaved", lambda *a, **k: pytest.fail("timed a bad shape"))
    code, _, err = run_cli(capsys, "bench", "--skip-models", "--shapes", shape)
    assert code == 2 and f"bad shape {shape!r}" in err and said in err


def test_shapes_of_3_to_5_dims_parse():
    assert cli_bench._shape("2x8x4") == [2, 8, 4]
    assert cli_bench._shape("2X8x4x4x2") == [2, 8, 4, 4, 2]


def test_trainable_batch_counts_the_last_stage_map_rounded_up():
    """The last stage's map is ceil(size / 32) wide: 33 px give 2x2, which trains at batch 1."""
    for batch, size in ((1, 33), (1, 64), (2, 32), (2, 16), (2, 1)):
        cli_bench.check_trainable_batch(batch, size)
    for batch, size in ((1, 32), (1, 16), (1, 1)):
        with pytest.raises(ValueError, match=f"--batch-size 1 at --img-size {size} leaves one value"):
            cli_bench.check_trainable_batch(batch, size)


def test_output_in_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    cli_bench.check_output_path(tmp_path / "new" / "res.json")  # a folder to be created: fine
    monkeypatch.setattr(cli_bench.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=f"{tmp_path} is not a writable folder"):
        cli_bench.check_output_path(tmp_path / "new" / "res.json")


# ---------------------------------------------------------------- the text table

def _layer_res(impls):
    times = {"clone": {"samples_ms": [1.0], "median_ms": 1.0}}
    for impl in impls:
        times[f"{impl}/fwd"] = {"samples_ms": [2.0], "median_ms": 2.0}
        times[f"{impl}/fwd+bwd"] = {"samples_ms": [6.0], "median_ms": 6.0}
    return {"shape": [2, 8, 4, 4], "groups": 4, "dtype": "float32", "times": times,
            "memory": {impl: {"saved_bytes": 2 ** 20, "peak_fwd_bwd_bytes": 3 * 2 ** 20} for impl in impls}}


def test_without_a_reference_row_the_speed_ups_are_dashes():
    res = _layer_res(["torch"])
    res["ratios"] = cli_bench.layer_ratios(res)
    assert res["ratios"]["torch"] == {"fwd_x_ref": None, "fwd_bwd_x_ref": None, "fwd_over_clone": 2.0}
    row = cli_bench._layer_text(res)[-1].split()
    assert row == ["torch", "2.000", "6.000", "-", "-", "2.00x", "1.0", "3.0"]


# ---------------------------------------------------------------- what run() hands model_bench

TINY = ("--skip-layers", "--model", "sa_resnet_test", "--baseline", "resnet18", "--batch-size", "2",
        "--img-size", "32")


def test_the_reference_row_runs_the_authors_formulation(capsys, fake_bench):
    code, out, err = run_cli(capsys, "bench", "--json", *TINY)
    assert code == 0, err
    assert fake_bench.specs["resnet18"] == {"model": "resnet18"}
    assert fake_bench.specs["sa_resnet_test[reference]"] == {"model": "sa_resnet_test", "sa_impl": "reference"}
    assert fake_bench.kwargs["amp"] is None  # float32: no autocast
    assert (fake_bench.kwargs["batch_size"], fake_bench.kwargs["img_size"]) == (2, 32)


@pytest.mark.parametrize("flag, amp", [("fp16", torch.float16), ("float16", torch.float16),
                                       ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16)])
def test_low_precision_runs_the_models_under_autocast_of_that_dtype(capsys, fake_bench, flag, amp):
    code, out, err = run_cli(capsys, "bench", "--json", "--dtype", flag, *TINY)
    assert code == 0, err
    assert fake_bench.kwargs["amp"] is amp
    assert json.loads(out)["models"]["amp"] == str(amp)


def test_threads_are_set_before_the_timing(capsys, fake_bench):
    torch.set_num_threads(2)
    code, _, err = run_cli(capsys, "bench", "--json", "--threads", "1", *TINY)
    assert code == 0, err
    assert fake_bench.threads == 1


def test_the_text_names_the_commit_and_uncommitted_changes(capsys, fake_bench, monkeypatch):
    info = {"sanet": "9.9", "timm": "t", "torch": "t", "git_commit": "abc1234", "git_dirty": True, "env": {}}
    monkeypatch.setattr(bench_mod, "run_info", lambda: dict(info))
    code, out, err = run_cli(capsys, "bench", *TINY)
    assert code == 0, err
    assert "sanet 9.9, commit abc1234+changes" in out.splitlines()[0]
    info["git_dirty"] = False
    assert "sanet 9.9, commit abc1234\n" in run_cli(capsys, "bench", *TINY)[1]
    info["git_commit"] = None  # an installed wheel: no commit to name
    assert "commit" not in run_cli(capsys, "bench", *TINY)[1].splitlines()[0]


def test_output_file_holds_the_printed_json(capsys, fake_bench, tmp_path):
    path = tmp_path / "out" / "bench.json"
    code, out, err = run_cli(capsys, "bench", "--json", "--output", str(path), *TINY)
    assert code == 0, err
    assert json.loads(path.read_text()) == json.loads(out)


# ---------------------------------------------------------------- model_bench's records

class Squares(nn.Module):
    """A tiny stand-in model whose product saves one tensor twice (2 saved tensors, 1 storage)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, num_classes)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        return h * h


def test_model_bench_records_autocast_and_the_saved_tensor_count(monkeypatch):
    import timm

    from sanet.analysis.memory import saved_tensor_bytes

    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: Squares(**kwargs))
    res = bench_mod.model_bench({"m": {"model": "squares"}}, batch_size=2, img_size=4, rounds=1,
                                amp=torch.bfloat16)
    assert res["amp"] == "torch.bfloat16"
    model = Squares()
    x, target = torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.CrossEntropyLoss()(model(x), target)

    saved = saved_tensor_bytes(loss)
    assert saved["tensors"] > saved["storages"]  # the two counts differ here
    assert res["memory"]["m"]["saved_tensors"] == saved["tensors"]
    assert bench_mod.model_bench({"m": {"model": "squares"}}, batch_size=2, img_size=4, rounds=1)["amp"] is None


def test_layers_without_a_fused_kernel_say_which_impls_were_timed(capsys, no_cpu_kernel):
    code, out, err = run_cli(capsys, "bench", "--json", "--dtype", "bf16", "--skip-models", "--shapes", "2x8x4x4",
                             "--rounds", "1")
    assert code == 0, err
    res = json.loads(out)
    note = "no fused SA kernel for cpu bfloat16: layers timed with reference, torch"
    assert res["notes"] == [note] and note in err
    assert set(res["layers"][0]["memory"]) == {"reference", "torch"}
