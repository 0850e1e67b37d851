"""``python -m sanet.demo`` without training: its recipe as ``sanet train`` parses it, and what
``main`` runs, returns and prints, with the two ``sanet`` commands replaced by fakes."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sanet.demo as demo


def test_the_recipe_is_valid_train_options_without_flips_or_tight_crops():
    from sanet.cli import build_parser

    args = build_parser().parse_args(demo.train_args(Path("d"), Path("o"), epochs=3, seed=5))
    assert args.command == "train" and args.model == "sa_resnet_test"
    assert (args.epochs, args.seed, args.img_size, args.workers) == (3, 5, 32, 0)
    assert args.data == Path("d") and args.output == Path("o")
    # digits are not mirror-symmetric, and a digit fills its frame
    assert args.hflip == 0.0 and args.crop_pct == 1.0 and args.scale == [0.6, 1.0]
    assert args.overwrite  # a second `make demo` trains again instead of refusing the folder
    assert args.deterministic and args.sched == "cosine"


def test_digits_use_the_full_8_bit_range(tmp_path):
    """The 0-16 intensities are scaled to 0-255: ink is white, background black."""
    demo.write_digits_imagefolder(tmp_path, size=8)  # 8 px: the scans' own size, no resampling
    extrema = [Image.open(p).getextrema() for p in sorted((tmp_path / "val" / "0").iterdir())[:10]]
    assert all(lo == 0 for lo, _ in extrema)
    assert all(hi == 255 for _, hi in extrema)  # every scan has some 16 (full ink) pixels
    pixels = np.asarray(Image.open(next((tmp_path / "train" / "8").iterdir())))
    assert pixels.shape == (8, 8) and set(np.unique(pixels)) <= {round(v * 255 / 16) for v in range(17)}


class FakeSanet:
    """Records each ``sanet`` command of the demo; eval prints ``result`` as its last line."""

    def __init__(self, result=None, train_code=0, eval_code=0):
        self.calls = []
        self.result = {"top1": 98.5, "top5": 100.0, "loss": 0.5, "images": 360} if result is None else result
        self.train_code, self.eval_code = train_code, eval_code

    def __call__(self, argv, capture=False):
        self.calls.append((list(argv), capture))
        if argv[0] == "train":
            return subprocess.CompletedProcess(argv, self.train_code, stdout=None)
        stdout = "evaluating...\n" + json.dumps(self.result) + "\n" if capture else None
        return subprocess.CompletedProcess(argv, self.eval_code, stdout=stdout)


@pytest.fixture
def digits(tmp_path):
    """An output folder whose digits/ split exists already (the demo then reuses it)."""
    for split, n in (("train", 3), ("val", 2)):
        folder = tmp_path / "digits" / split / "0"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("L", (4, 4)).save(folder / f"{i}.png")
    return tmp_path


def test_main_trains_then_evaluates_the_final_weights_on_the_held_out_split(digits, monkeypatch, capsys):
    fake = FakeSanet()
    monkeypatch.setattr(demo, "_sanet", fake)
    monkeypatch.setattr(demo, "write_digits_imagefolder", lambda *a, **k: pytest.fail("data rewritten"))
    assert demo.main(["--out", str(digits)]) == 0
    (train, train_capture), (evaluate, eval_capture) = fake.calls
    assert train == demo.train_args(digits / "digits", digits / "run", 20, 0) + ["--no-progress"]  # 20 epochs
    assert not train_capture and eval_capture  # the eval's JSON is read from its stdout
    # last.pt, not best.pt (chosen on this same split), on val/
    assert evaluate[:5] == ["eval", "--checkpoint", str(digits / "run" / "last.pt"), "--data",
                            str(digits / "digits" / "val")]
    assert "--json" in evaluate
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert json.loads(lines[-1]) == fake.result  # the last line: the eval's JSON
    summary = next(line for line in lines if line.startswith("demo: "))
    assert "trained 20 epochs on 3 train images (2 val)" in summary
    assert "top-1 98.50%, top-5 100.00%" in summary
    assert "below" not in err


def test_main_passes_its_options_on(digits, monkeypatch, capsys):
    fake = FakeSanet()
    monkeypatch.setattr(demo, "_sanet", fake)
    assert demo.main(["--out", str(digits), "--epochs", "2", "--seed", "7"]) == 0
    args = fake.calls[0][0]
    assert args[args.index("--epochs") + 1] == "2" and args[args.index("--seed") + 1] == "7"


def test_main_fails_below_97_percent_and_says_so(digits, monkeypatch, capsys):
    monkeypatch.setattr(demo, "_sanet", FakeSanet({"top1": 96.9, "top5": 99.0}))
    assert demo.main(["--out", str(digits)]) == 1
    out, err = capsys.readouterr()
    assert "below the expected 97% top-1" in err
    assert json.loads(out.strip().splitlines()[-1])["top1"] == 96.9  # still printed
    monkeypatch.setattr(demo, "_sanet", FakeSanet({"top1": 97.0, "top5": 99.0}))
    assert demo.main(["--out", str(digits)]) == 0  # 97% itself passes
    assert "below" not in capsys.readouterr().err


@pytest.mark.parametrize("failing", ["train", "eval"])
def test_a_failed_command_fails_the_demo(digits, monkeypatch, capsys, failing):
    fake = FakeSanet(train_code=int(failing == "train"), eval_code=int(failing == "eval"))
    if failing == "eval":
        fake.result = "not json"
    monkeypatch.setattr(demo, "_sanet", fake)
    assert demo.main(["--out", str(digits)]) == 1
    assert len(fake.calls) == (1 if failing == "train" else 2)  # no eval after a failed training


def test_progress_bars_only_on_a_terminal(digits, monkeypatch, capsys):
    fake = FakeSanet()
    monkeypatch.setattr(demo, "_sanet", fake)
    monkeypatch.setattr(demo.sys.stderr, "isatty", lambda: True, raising=False)
    assert demo.main(["--out", str(digits)]) == 0
    assert "--no-progress" not in fake.calls[0][0]


def test_missing_data_are_written_first(tmp_path, monkeypatch, capsys):
    written = []

    def fake_write(root):
        written.append(root)
        (root / "val").mkdir(parents=True)
        return {"train": 1437, "val": 360, "classes": 10}

    monkeypatch.setattr(demo, "write_digits_imagefolder", fake_write)
    monkeypatch.setattr(demo, "_sanet", FakeSanet())
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert written == [tmp_path / "digits"]
    assert "1437 train / 360 val images, 10 classes" in capsys.readouterr().out


def test_subcommands_run_with_a_passive_openmp_wait_unless_set(monkeypatch):
    seen = []

    def fake_run(argv, env=None, text=None, stdout=None):
        seen.append((argv, env["OMP_WAIT_POLICY"], stdout))
        return subprocess.CompletedProcess(argv, 0, stdout="")

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    demo._sanet(["eval", "--json"], capture=True)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    demo._sanet(["train"])
    assert seen[0] == ([demo.sys.executable, "-m", "sanet", "eval", "--json"], "PASSIVE", subprocess.PIPE)
    assert seen[1][1:] == ("ACTIVE", None)  # the user's setting wins; output not captured
