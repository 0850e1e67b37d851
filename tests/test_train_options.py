"""``sanet train``'s option checks at their edges, unit level (parser + ``validate_train_args``,
no data, no run): each bound accepts its last valid value and refuses the first invalid one,
and ``--model-kwargs K=V`` splits and reads values as documented."""
from __future__ import annotations

import pytest

from engine_utils import parse_train_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _check(*argv: str):
    from sanet.engine.config import validate_train_args

    args = parse_train_args(*argv)
    validate_train_args(args)
    return args


@pytest.mark.parametrize("good, bad, message", [
    (["--hflip", "1"], ["--hflip", "1.01"], "--hflip must be a probability in [0, 1], got 1.01"),
    (["--smoothing", "0.99"], ["--smoothing", "1"], "--smoothing must be in [0, 1), got 1.0"),
    (["--crop-pct", "0.25"], ["--crop-pct", "0.2499"], "--crop-pct must be at least 0.25"),
    (["--seed", str(2**32 - 1)], ["--seed", str(2**32)], f"--seed must be in [0, 2**32), got {2**32}"),
    (["--cutmix", "1", "-b", "4"], ["--cutmix", "1", "-b", "3"],
     "--mixup/--cutmix pair images within a batch: --batch-size must be even, got 3"),
    (["--mixup", "0.2", "-b", "4"], ["--mixup", "0.2", "-b", "5"], "--batch-size must be even, got 5"),
    (["--accum-steps", "1"], ["--accum-steps", "0"], "--accum-steps must be at least 1, got 0"),
    (["--lr", "1e-9"], ["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--momentum", "0.999"], ["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--decay-rate", "1"], ["--decay-rate", "1.5"], "--decay-rate must be in (0, 1], got 1.5"),
    (["--model-ema-decay", "1e-6"], ["--model-ema-decay", "0"], "--model-ema-decay must be in (0, 1), got 0.0"),
])
def test_each_bound_accepts_its_edge_and_refuses_past_it(good, bad, message):
    _check(*good)
    with pytest.raises(ValueError) as info:
        _check(*bad)
    assert message in str(info.value)


def test_resume_and_overwrite_together_are_refused():
    _check("--resume")
    _check("--overwrite")
    with pytest.raises(ValueError, match="--resume and --overwrite contradict each other"):
        _check("--resume", "--overwrite")


@pytest.mark.parametrize("items, expected", [
    (["sa_groups=32", "flag=True", "size=(1, 2)"], {"sa_groups": 32, "flag": True, "size": (1, 2)}),
    (["norm_layer=groupnorm1"], {"norm_layer": "groupnorm1"}),  # ValueError in literal_eval: kept as text
    (["act=hard swish"], {"act": "hard swish"}),  # SyntaxError in literal_eval: kept as text too
    (["a=b=c"], {"a": "b=c"}),  # split at the first '='
    (["x="], {"x": ""}),
])
def test_model_kwargs_are_split_at_the_first_equals_and_read_as_literals(items, expected):
    assert parse_train_args("--model-kwargs", *items).model_kwargs == expected


@pytest.mark.parametrize("item", ["=5", "sa_groups"])
def test_model_kwargs_without_a_key_are_usage_errors(capsys, item):
    with pytest.raises(SystemExit) as info:
        parse_train_args("--model-kwargs", item)
    assert info.value.code == 2
    assert f"--model-kwargs: {item!r} is not K=V (e.g. sa_groups=32)" in capsys.readouterr().err


def test_a_model_kwarg_given_twice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_train_args("--model-kwargs", "sa_groups=32", "drop_rate=0.1", "sa_groups=16")
    assert info.value.code == 2
    assert "--model-kwargs: sa_groups is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--output", "--data", "--pretrained-file"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_path_is_a_usage_error_not_the_current_folder(capsys, option, value):
    with pytest.raises(SystemExit) as info:
        parse_train_args(option, value)
    assert info.value.code == 2
    assert "empty path (an unset shell variable?); give a folder" in capsys.readouterr().err


@pytest.mark.parametrize("cpus, workers", [(1, 1), (3, 3), (4, 4), (64, 4), (None, 1)])
def test_default_workers_are_4_or_the_cpu_count_if_lower(monkeypatch, cpus, workers):
    import os

    from sanet.engine.config import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert default_workers() == workers
