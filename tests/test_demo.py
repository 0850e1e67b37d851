"""The demo: scikit-learn digits as an ImageFolder, and one short end-to-end run."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess

from PIL import Image


def test_digits_imagefolder_is_a_fixed_stratified_split(tmp_path):
    from sanet.demo import write_digits_imagefolder

    counts = write_digits_imagefolder(tmp_path / "a")
    assert counts == {"train": 1437, "val": 360, "classes": 10}
    for split, n in (("train", 1437), ("val", 360)):
        folders = sorted(p.name for p in (tmp_path / "a" / split).iterdir())
        assert folders == [str(d) for d in range(10)]
        assert sum(1 for _ in (tmp_path / "a" / split).rglob("*.png")) == n
    per_class = [len(list((tmp_path / "a" / "val" / str(d)).iterdir())) for d in range(10)]
    assert min(per_class) >= 35 and max(per_class) <= 37  # stratified: ~20% of each digit
    with Image.open(next((tmp_path / "a" / "val" / "3").iterdir())) as img:
        assert img.size == (32, 32) and img.mode == "L" and img.getextrema()[1] > 128
    write_digits_imagefolder(tmp_path / "b")
    names = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))  # noqa: E731
    assert names(tmp_path / "a") == names(tmp_path / "b")  # same split every time


def test_demo_runs_end_to_end_and_ends_with_the_eval_json(tmp_path, monkeypatch, capsys, one_thread):
    """One epoch instead of 20, commands run in-process instead of as subprocesses."""
    import sanet.demo as demo
    from sanet.cli import main as sanet

    def in_process(argv, capture=False):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
            code = sanet(argv)
        return subprocess.CompletedProcess(argv, code, stdout=buf.getvalue() if capture else None)

    monkeypatch.setattr(demo, "_sanet", in_process)
    code = demo.main(["--out", str(tmp_path), "--epochs", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"top1", "top5", "loss", "images"} <= result.keys() and result["images"] == 360
    assert code == (0 if result["top1"] >= 97.0 else 1)
    assert any(line.startswith("demo: sa_resnet_test trained 1 epochs") for line in lines)
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "last.pt").is_file()
    assert result["top1"] > 14.0  # one warmup epoch already learns (10 classes: chance is 10%, +-1.6 on 360)
