"""Mutation round on the engine's file handling: ``sanet/engine/images.py``,
``sanet/engine/run_dir.py``, ``sanet/demo.py`` and ``sanet/engine/logs.py``.

Each test here kills mutants that the rest of the suite let live (a check dropped, a flag
flipped, a write made non-atomic, ...). All of them run without training a model."""
from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sanet.engine import run_dir
from sanet.engine.run_dir import REPLACED_DIR


# --------------------------------------------------------------------------- images
def _pgm16(path: Path, values: np.ndarray) -> Path:
    """A binary 16-bit PGM (P5, maxval 65535: big-endian samples)."""
    height, width = values.shape
    path.write_bytes(b"P5\n%d %d\n65535\n" % (width, height) + values.astype(">u2").tobytes())
    return path


def test_16_bit_data_decoded_into_mode_I_is_scaled_too(tmp_path):
    """Pillow opens a 16-bit PGM as mode "I" (its decoder's raw mode says 16 bits), not "I;16"
    as it does PNGs: it is scaled x / 257 like them, not clipped at 255."""
    from sanet.engine.images import load_rgb

    values = np.array([[0, 9000], [1000, 65535]], dtype=np.uint16)
    path = _pgm16(tmp_path / "g16.pgm", values)
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (2, 2, 3)
    assert rgb[..., 1].tolist() == [[0, 35], [4, 255]]  # 9000 / 257 = 35.02, 1000 / 257 = 3.89


def test_signed_16_bit_values_never_wrap_around(tmp_path):
    """A signed 16-bit TIFF (raw mode I;16S) is 16-bit data too: a negative value must not come
    out brighter than a positive one (uint8 wrap-around: -257 / 257 = -1 -> 255)."""
    from sanet.engine.images import load_rgb

    values = np.array([[-257, -32768, 0, 9000, 32767]], dtype=np.int16)
    Image.frombuffer("I;16", (5, 1), values.tobytes(), "raw", "I;16", 0, 1).save(tmp_path / "s16.tif",
                                                                                tiffinfo={339: 2})  # SampleFormat: signed
    grey = np.asarray(load_rgb(tmp_path / "s16.tif"))[0, :, 0].astype(int)
    order = np.argsort(values[0], kind="stable")
    assert (np.diff(grey[order]) >= 0).all(), grey  # brightness follows the values
    assert grey[3] == 35  # 9000 / 257, as for unsigned data


# --------------------------------------------------------------------------- run folder: checks
def test_an_output_that_is_a_file_is_named_as_such(tmp_path):
    afile = tmp_path / "run"
    afile.write_text("not a folder")
    with pytest.raises(ValueError, match=r"--output .*run is a file; give a folder"):
        run_dir.check_output(afile, resume=False, overwrite=False)


# --------------------------------------------------------------------------- run folder: the lock
def test_the_lock_names_its_holder_and_is_released_with_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / run_dir.LOCK_FILE).write_text("123456789012\n")  # a longer pid, left by an earlier run
    with run_dir._output_lock(out):
        # what a second run reads: this pid alone, not its digits over the old ones
        assert (out / run_dir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=rf"another sanet train \(process {os.getpid()}\) is writing"):
            run_dir.check_not_busy(out)  # a separate open file: flock conflicts within a process too
    run_dir.check_not_busy(out)  # released
    with run_dir._output_lock(out):
        pass


def test_a_file_system_without_locks_runs_unguarded(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    entered = []
    with run_dir._output_lock(tmp_path / "run"):
        entered.append(True)
    assert entered and (tmp_path / "run").is_dir()


def test_claim_output_moves_the_previous_run_aside_on_the_main_process_only(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_text("old last")
    notes = []
    with run_dir.claim_output(out, overwrite=False, main=False, say=notes.append) as checkpointed:
        assert not (out / REPLACED_DIR).exists() and not (out / run_dir.LOCK_FILE).exists()  # rank > 0
        checkpointed()
    with run_dir.claim_output(out, overwrite=True, main=True, say=notes.append) as checkpointed:
        assert (out / REPLACED_DIR / "last.pt").read_text() == "old last" and not (out / "last.pt").exists()
        (out / "last.pt").write_text("new last")
        checkpointed()
    assert (out / "last.pt").read_text() == "new last" and not (out / REPLACED_DIR).exists() and notes == []


# --------------------------------------------------------------------------- run folder: overwrite guard
@pytest.fixture()
def moved_aside(tmp_path):
    """OUT after ``--overwrite`` moved a previous run (last.pt "old last") aside."""
    out = tmp_path / "run"
    (out / REPLACED_DIR).mkdir(parents=True)
    (out / REPLACED_DIR / "last.pt").write_text("old last")
    return out


def test_after_the_first_checkpoint_a_failure_never_restores(moved_aside, monkeypatch):
    """Even when the previous run's files could not be deleted: from the checkpoint on, the new
    run is the one to keep."""
    monkeypatch.setattr(run_dir, "_discard", lambda replaced: None)  # nothing deleted
    with pytest.raises(RuntimeError, match="boom") as info:
        with run_dir.overwrite_guard(moved_aside, active=True) as checkpointed:
            (moved_aside / "last.pt").write_text("new last")
            checkpointed()
            raise RuntimeError("boom in epoch 2")
    assert (moved_aside / "last.pt").read_text() == "new last"
    assert not getattr(info.value, "previous_run_restored", False)


def test_a_failure_restores_and_says_so_with_sigterm_ignored_meanwhile(moved_aside, monkeypatch, capsys):
    before, seen = signal.getsignal(signal.SIGTERM), []
    real = run_dir.restore_replaced
    monkeypatch.setattr(run_dir, "restore_replaced",
                        lambda out: seen.append(signal.getsignal(signal.SIGTERM)) or real(out))
    with pytest.raises(KeyboardInterrupt) as info:
        with run_dir.overwrite_guard(moved_aside, active=True):
            (moved_aside / "last.pt").write_text("new last")
            raise KeyboardInterrupt
    assert seen == [signal.SIG_IGN]  # a second SIGTERM can't cut the restore short
    assert info.value.previous_run_restored is True
    assert (moved_aside / "last.pt").read_text() == "old last" and not (moved_aside / REPLACED_DIR).exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler is back
    assert f"the previous run in {moved_aside} is restored" in capsys.readouterr().err


def test_sigterm_becomes_exit_143_that_says_whether_it_restored(moved_aside):
    before = signal.getsignal(signal.SIGTERM)
    for active in (True, False):  # False: nothing restored by this process (rank > 0)
        with pytest.raises(SystemExit) as info:
            with run_dir.overwrite_guard(moved_aside, active=active):
                run_dir._on_sigterm(signal.SIGTERM, None)
        assert info.value.code == 143 and info.value.previous_run_restored is active  # 128 + SIGTERM's 15
        assert info.value.__cause__ is None and info.value.__suppress_context__
        assert signal.getsignal(signal.SIGTERM) is before


def test_the_guard_works_outside_the_main_thread(moved_aside):
    """signal.signal raises ValueError outside the main thread: there no handler is installed,
    and an exception still restores."""
    errors = []

    def body():
        try:
            with run_dir.overwrite_guard(moved_aside, active=True):
                raise RuntimeError("boom")
        except RuntimeError as exc:
            errors.append(getattr(exc, "previous_run_restored", None))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert errors == [True] and (moved_aside / "last.pt").read_text() == "old last"


def test_discarding_reports_only_what_it_could_not_delete(moved_aside, monkeypatch, capsys):
    trash = moved_aside / f"{REPLACED_DIR}.{os.getpid()}.discarded"
    trash.mkdir()
    (trash / "x").write_text("left by an earlier run of this pid")  # os.replace can't go over it
    with run_dir.overwrite_guard(moved_aside, active=True) as checkpointed:
        checkpointed()
    assert not (moved_aside / REPLACED_DIR).exists() and capsys.readouterr().err == ""
    (moved_aside / REPLACED_DIR).mkdir()
    monkeypatch.setattr(run_dir.shutil, "rmtree", lambda *a, **k: None)  # say, an immutable file
    with run_dir.overwrite_guard(moved_aside, active=True) as checkpointed:
        checkpointed()
    assert "could not delete all of the replaced run's files" in capsys.readouterr().err


# --------------------------------------------------------------------------- demo
@pytest.fixture()
def fake_digits(monkeypatch):
    """scikit-learn's load_digits() replaced by 2 classes of 10 random 8x8 scans (values 0-16):
    the 80/20 split is then 16 train and 4 val images."""
    from types import SimpleNamespace

    import sklearn.datasets

    rng = np.random.default_rng(0)
    bunch = SimpleNamespace(images=rng.integers(0, 17, size=(20, 8, 8)).astype(float),
                            target=np.repeat([0, 1], 10), target_names=np.arange(2))
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: bunch)
    return bunch


class _FakeSanet:
    """``sanet train`` and ``sanet eval --json`` replaced: records the command lines."""

    def __init__(self):
        self.calls = []

    def __call__(self, argv, capture=False):
        import json
        import subprocess

        self.calls.append(list(argv))
        stdout = json.dumps({"top1": 99.0, "top5": 100.0}) + "\n" if capture else None
        return subprocess.CompletedProcess(argv, 0, stdout=stdout)


def test_digits_are_upscaled_bicubic(tmp_path, fake_digits):
    import sanet.demo as demo

    demo.write_digits_imagefolder(tmp_path / "8", size=8)  # the scans' own size: no resampling
    demo.write_digits_imagefolder(tmp_path / "32", size=32)
    smalls = sorted((tmp_path / "8").rglob("*.png"))
    assert len(smalls) == 20
    for small in smalls:
        expected = Image.open(small).resize((32, 32), Image.BICUBIC)
        got = Image.open(tmp_path / "32" / small.relative_to(tmp_path / "8"))
        assert np.array_equal(np.asarray(got), np.asarray(expected)), small


def test_a_data_split_cut_short_is_not_taken_for_a_complete_one(tmp_path, fake_digits, monkeypatch, capsys):
    """Ctrl-C while the demo writes val/ left a partial val/, which every later ``make demo``
    took as the data (and evaluated on the images it happened to hold)."""
    import sanet.demo as demo

    real_save, saved = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        if len(saved) == 18:  # the 16 train images, then 2 of the 4 val ones
            raise KeyboardInterrupt
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(KeyboardInterrupt):
        demo.write_digits_imagefolder(tmp_path / "digits", seed=1)  # another split: none of its files may stay
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert not (tmp_path / "digits" / "val").exists()
    fake = _FakeSanet()
    monkeypatch.setattr(demo, "_sanet", fake)
    assert demo.main(["--out", str(tmp_path), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "16 train / 4 val images, 2 classes" in out  # written again, whole
    assert "trained 2 epochs on 16 train images (4 val)" in out
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["train", "val"]  # nothing partial left
    # the final weights, on the held-out split, in this process's data loading
    assert fake.calls[1] == ["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--data",
                             str(tmp_path / "digits" / "val"), "--workers", "0", "--json"]


# --------------------------------------------------------------------------- logs
def test_csv_columns_once_each_and_a_failed_write_keeps_the_previous_log(tmp_path, monkeypatch):
    """A full disk mid-write: log.csv stays the previous epoch's, whole (no temp file left)."""
    import csv

    from sanet.engine.logs import write_csv

    path = tmp_path / "log.csv"
    rows = [{"epoch": 1, "val_top1": 10.0}, {"epoch": 2, "val_top1": 20.0, "val_images": 12}]
    write_csv(rows[:1], path)
    before = path.read_bytes()
    real = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_csv(rows, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["log.csv"]
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"epoch": "1", "val_top1": "10.0"}]
    write_csv(rows, path)  # a later row adds a column: once, after the others
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ["epoch", "val_top1", "val_images"]
        f.seek(0)
        assert list(csv.DictReader(f)) == [{"epoch": "1", "val_top1": "10.0", "val_images": ""},
                                           {"epoch": "2", "val_top1": "20.0", "val_images": "12"}]


def test_tensorboard_events_are_on_disk_after_each_epoch_and_close_stops_the_writer(tmp_path, monkeypatch):
    """TensorBoard shows a running job's epochs, and a kill -9 keeps the logged ones: each
    epoch's events are written before log_epoch returns (the writer's thread writes them
    later, here slowly, and flushes every 2 minutes), and close() ends that thread. The step
    is the row's epoch: a resumed checkpoint without a history starts the list at its epoch."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.record_writer import RecordWriter

    from sanet.engine.logs import RunLogger

    real_write = RecordWriter.write
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: time.sleep(0.2) or real_write(self, data))
    before = set(threading.enumerate())
    logger = RunLogger(tmp_path, 5)
    rows = [{"epoch": 6, "train_loss": 2.5}, {"epoch": 7, "train_loss": 1.5}]
    logger.log_epoch(rows[:1])
    logger.log_epoch(rows)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/train_loss")] == [(6, 2.5), (7, 1.5)]
    writers = set(threading.enumerate()) - before  # the event writer's thread (other threads may come and go)
    logger.close()
    assert writers and not any(t.is_alive() for t in writers)


_HISTORY = [{"epoch": 1, "train_loss": 2.0, "val_loss": 1.8, "val_top1": 40.0, "val_top5": 90.0},
            {"epoch": 2, "train_loss": 1.0, "val_loss": 0.9, "val_top1": 60.0, "val_top5": 95.0,
             "val_loss_ema": 1.1, "val_top1_ema": 55.0}]  # EMA values in epoch 2 only


def test_curves_show_every_series_that_has_a_value_with_integer_epochs(tmp_path, monkeypatch):
    from sanet.engine import logs

    plt = logs.load_plotting()
    close, figures = plt.close, []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to look at
    path = tmp_path / "curves.png"
    assert logs.plot_curves(_HISTORY, path, title="sa_resnet_test") == path
    logs.plot_curves(_HISTORY[:1], tmp_path / "first.png")  # no EMA yet, no title
    monkeypatch.undo()
    try:
        fig, first = figures
        assert fig.get_suptitle() == "sa_resnet_test" and first.get_suptitle() == ""
        loss, acc = fig.axes
        for ax, keys in ((loss, ("train_loss", "val_loss", "val_loss_ema")),
                         (acc, ("val_top1", "val_top5", "val_top1_ema"))):
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert sorted(lines) == sorted(keys)
            for key in keys:
                assert list(lines[key].get_xdata()) == [1, 2]
                y = np.asarray(lines[key].get_ydata(), dtype=float)
                assert np.allclose(y, [row.get(key, np.nan) for row in _HISTORY], equal_nan=True), key
            assert all(float(t).is_integer() for t in ax.get_xticks())  # epochs: no 1.2, 1.4, ...
        assert (loss.get_ylabel(), acc.get_ylabel()) == ("loss", "accuracy (%)")
        assert [line.get_label() for line in first.axes[0].get_lines()] == ["train_loss", "val_loss"]
    finally:
        for f in figures:
            close(f)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1000, 400)  # 10 x 4 inches at 100 dpi


def test_curves_close_their_figure_and_draw_without_a_display(tmp_path, monkeypatch):
    import matplotlib

    from sanet.engine import logs

    plt = logs.load_plotting()
    monkeypatch.setitem(matplotlib.rcParams, "backend", "svg")  # a matplotlibrc naming another backend
    logs.load_plotting()
    assert matplotlib.get_backend().lower() == "agg"
    open_figures = plt.get_fignums()
    logs.plot_curves(_HISTORY, tmp_path / "curves.png")
    assert plt.get_fignums() == open_figures  # one figure per epoch would pile up otherwise


def test_a_failed_curves_write_keeps_the_previous_picture(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from sanet.engine import logs

    path = tmp_path / "curves.png"
    logs.plot_curves(_HISTORY[:1], path)
    before = path.read_bytes()

    def full_disk(self, fname, **kwargs):
        Path(fname).write_bytes(before[: len(before) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space left"):
        logs.plot_curves(_HISTORY, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
