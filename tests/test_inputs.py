"""What users feed the commands: 16-bit and GIF images, folders and many files for predict,
unwritable outputs, one-class data, epochs without a readable image, Ctrl-C under --json."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine_utils import make_imagefolder, run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- image files
def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """Pillow's convert("RGB") clipped 16-bit greyscale: 9000/65535 (14% grey) became white."""
    from sanet.engine.images import load_rgb

    values = np.array([[0, 9000, 1000], [32896, 65535, 65280]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # Pillow reads it as 16-bit
    rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (2, 3, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[..., 0].tolist() == [[0, 35, 4], [128, 255, 254]]  # x / 257, rounded (3.89 -> 4)
    Image.fromarray(np.rint(values / 257).astype(np.uint8)).save(tmp_path / "g8.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "g8.png")), rgb)  # as its 8-bit twin
    Image.fromarray(np.array([[0, 200]], dtype=np.int32)).save(tmp_path / "i32.tif")  # mode "I", 32-bit
    assert np.asarray(load_rgb(tmp_path / "i32.tif"))[..., 0].tolist() == [[0, 200]]  # not divided


def test_gif_images_are_part_of_the_dataset(tmp_path):
    from sanet.engine.data import open_image_folder

    root = make_imagefolder(tmp_path / "d", splits={"val": 2})
    Image.new("P", (16, 16)).save(root / "val" / "a" / "extra.gif")
    assert len(open_image_folder(root / "val", "evaluation")) == 7


def test_samples_are_in_sorted_order_whatever_the_file_system_lists(tmp_path, monkeypatch):
    """A seeded run draws the same images on every machine (and under torchrun every rank
    lists the same samples) only if the order does not follow the file system's."""
    import sanet.engine.data as data_mod
    from sanet.engine.data import open_image_folder

    root = make_imagefolder(tmp_path / "d", splits={"val": 3})
    (root / "val" / "a" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "a" / "sub" / "000.png")
    real_walk = os.walk

    def reversed_walk(top, *args, **kwargs):  # a file system that lists backwards
        found = list(real_walk(top, *args, **kwargs))
        for _, dirs, files in found:
            dirs.reverse(), files.reverse()
        return reversed(found)

    monkeypatch.setattr(data_mod.os, "walk", reversed_walk)
    samples = open_image_folder(root / "val", "evaluation").samples
    assert len(samples) == 10 and samples == sorted(samples, key=lambda s: (s[1], os.path.split(s[0])))


def test_links_to_folders_are_followed_but_each_folder_is_read_once(tmp_path, monkeypatch):
    """A link back up the tree (a/loop -> .) counted a's images once per level until the
    path grew too long (2 images were 42); a link to a folder elsewhere is followed."""
    import sanet.engine.data as data_mod
    from sanet.engine.data import open_image_folder

    real_walk, listed = data_mod.os.walk, []

    def bounded_walk(*args, **kwargs):  # two loops without the guard branch ~2**40 ways: fail, don't hang
        for entry in real_walk(*args, **kwargs):
            listed.append(entry[0])
            if len(listed) > 100:
                raise AssertionError(f"walked {len(listed)} folders, e.g. {entry[0]}: the link loops are followed")
            yield entry

    monkeypatch.setattr(data_mod.os, "walk", bounded_walk)

    root = make_imagefolder(tmp_path / "d", splits={"val": 2})
    (root / "val" / "a" / "loop").symlink_to(".", target_is_directory=True)
    (root / "val" / "a" / "sub").mkdir()
    (root / "val" / "a" / "sub" / "up").symlink_to("..", target_is_directory=True)
    extra = make_imagefolder(tmp_path / "e", splits={"val": 3}, classes=("z",))
    (root / "val" / "b" / "more").symlink_to(extra / "val" / "z", target_is_directory=True)
    dataset = open_image_folder(root / "val", "evaluation")
    paths = [Path(p).resolve() for p, _ in dataset.samples]
    assert len(paths) == len(set(paths)) == 2 + 2 + 3 + 2  # a, b + 3 linked, c
    assert sum(t == dataset.class_to_idx["b"] for _, t in dataset.samples) == 5


def test_predict_reads_in_batches_and_refuses_a_folder(capsys, trained_run, data, monkeypatch):
    import sanet.engine.predict as predict

    images = sorted((data / "val").rglob("*.png"))
    code, out, _ = run_cli(capsys, ["predict", "--checkpoint", str(trained_run / "last.pt"), *map(str, images), "--json"])
    whole = json.loads(out)["predictions"]
    sizes = []
    real = predict.read_readable_images
    monkeypatch.setattr(predict, "read_readable_images", lambda paths, t: sizes.append(len(paths)) or real(paths, t))
    code, out, _ = run_cli(capsys, ["predict", "--checkpoint", str(trained_run / "last.pt"), *map(str, images),
                                    "--json", "--batch-size", "5"])
    assert code == 0 and sizes == [5, 5, 2]
    batched = json.loads(out)["predictions"]
    assert [p["image"] for p in batched] == [p["image"] for p in whole]
    for a, b in zip(batched, whole):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert a["top"][0]["prob"] == pytest.approx(b["top"][0]["prob"], abs=1e-5)
    code, _, err = run_cli(capsys, ["predict", "--checkpoint", str(trained_run / "last.pt"), str(data / "val")])
    assert code == 2 and f"{data / 'val'} is a folder; pass image files" in err
    code, _, err = run_cli(capsys, ["predict", "--checkpoint", "missing.pt", str(data / "val")])
    assert code == 2 and "is a folder" in err  # checked before the model is loaded
    code, _, err = run_cli(capsys, ["predict", "--checkpoint", str(trained_run / "last.pt"), str(images[0]), "-b", "0"])
    assert code == 2 and "--batch-size must be at least 1, got 0" in err


# --------------------------------------------------------------------------- outputs
def test_output_below_a_file_or_read_only_is_refused_first(capsys, tmp_path, data, monkeypatch):
    import sanet.engine.trainer as trainer

    (tmp_path / "afile").write_text("x")
    code, out, err = run_cli(capsys, train_argv(data, tmp_path / "afile" / "run", "--json"))
    assert code == 2 and "afile is a file, so no folder can be made there" in err
    assert json.loads(out)["command"] == "train"
    real_access = os.access  # (root may write anywhere: the check's answer is what is tested)
    # a folder that can be written but not entered (no X) is refused too
    monkeypatch.setattr(trainer.os, "access",
                        lambda p, mode: not (p == tmp_path and mode & os.X_OK) and real_access(p, mode))
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "ro" / "run"))
    assert code == 2 and "is not writable" in err and not (tmp_path / "ro").exists()
    (tmp_path / "existing").mkdir()  # the output folder itself, when it exists
    monkeypatch.setattr(trainer.os, "access", lambda p, mode: p != tmp_path / "existing" and real_access(p, mode))
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "existing"))
    assert code == 2 and f"{tmp_path / 'existing'} is not writable" in err


def test_output_through_a_broken_link_or_unusable_name_is_refused_first(capsys, tmp_path, data, monkeypatch):
    """A dangling link (a file system not mounted) passed the early check and failed after the
    data and model loaded, as "[Errno 17] File exists"; a name too long gave a traceback; an
    empty --output (an unset shell variable) trained into the current folder."""
    import sanet.engine.trainer as trainer

    def must_not_load(*args, **kwargs):
        raise AssertionError("the data was opened before --output was checked")

    monkeypatch.setattr(trainer, "open_train_val", must_not_load)
    (tmp_path / "mnt").symlink_to(tmp_path / "not-mounted")
    code, out, err = run_cli(capsys, train_argv(data, tmp_path / "mnt" / "run", "--json"))
    assert code == 2 and f"{tmp_path / 'mnt'} is a symbolic link to {tmp_path / 'not-mounted'}, which does not " \
        "exist" in err and "Traceback" not in err
    assert json.loads(out)["command"] == "train" and not (tmp_path / "not-mounted").exists()
    code, out, err = run_cli(capsys, train_argv(data, tmp_path / ("a" * 300), "--json"))
    assert code == 2 and "File name too long" in err and "Traceback" not in err and json.loads(out)["error"]
    with pytest.raises(SystemExit):
        run_cli(capsys, train_argv(data, ""))
    assert "argument --output: empty path (an unset shell variable?)" in capsys.readouterr().err


def test_file_system_errors_are_user_errors_and_bugs_are_not(capsys, trained_run, tmp_path):
    from sanet.cli import _for_the_user

    for code in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP):
        assert _for_the_user(OSError(code, "file system full or read-only", "x"))
    assert _for_the_user(PermissionError(errno.EACCES, "Permission denied", "x"))
    assert _for_the_user(IsADirectoryError(errno.EISDIR, "Is a directory", "x"))
    assert not _for_the_user(OSError(errno.EIO, "Input/output error", "x"))
    (tmp_path / "afile").write_text("x")
    code, out, err = run_cli(capsys, ["convert", str(trained_run / "last.pt"), str(tmp_path / "afile" / "d" / "w.safetensors"),
                                      "--model", "sa_resnet_test", "--json"])
    assert f"{tmp_path / 'afile'}, is not a folder" in err
    assert code == 2 and "part of its folder path" in err and "is not a folder" in err and "Traceback" not in err
    assert json.loads(out)["command"] == "convert"


# --------------------------------------------------------------------------- data
def test_one_class_is_refused(capsys, tmp_path):
    one = make_imagefolder(tmp_path / "one", classes=("only",))
    code, _, err = run_cli(capsys, train_argv(one, tmp_path / "r"))
    assert code == 2 and "holds one class folder ('only'): a classifier needs at least 2 classes" in err


def test_an_epoch_without_a_readable_image_stops(capsys, tmp_path):
    """With --skip-bad-images, batches with fewer than 2 readable images are skipped; an epoch
    of only those trained nothing, and logged a loss of 0 as if it had."""
    root = make_imagefolder(tmp_path / "d", splits={"train": 1, "val": 2})
    for folder in sorted((root / "train").iterdir()):
        for j in range(5):  # 15 unreadable + 1 readable = 4 full batches of 4: none dropped
            (folder / f"bad{j}.png").write_bytes(b"broken")
    for good in ("b", "c"):  # one readable training image is left: no batch has two
        (root / "train" / good / "000.png").unlink()
    code, _, err = run_cli(capsys, train_argv(root, tmp_path / "r", "--skip-bad-images", batch=4))
    assert code == 2 and "epoch 1 trained on no image: 15 training image(s) could not be read" in err
    assert "No checkpoint had been written yet" in err


def test_ctrl_c_under_json_prints_a_json_object(capsys, tmp_path, data, monkeypatch):
    import sanet.engine.trainer as trainer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    real = trainer.train_one_epoch
    monkeypatch.setattr(trainer, "train_one_epoch", interrupt)
    code, out, err = run_cli(capsys, train_argv(data, tmp_path / "r", "--json"))
    # stopped in epoch 1 of a fresh run: there is no last.pt to --resume from
    assert code == 130 and "there is nothing to resume" in err and "--resume" not in err
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    assert run_cli(capsys, train_argv(data, tmp_path / "r2"))[0] == 0
    monkeypatch.setattr(trainer, "train_one_epoch", interrupt)
    code, out, err = run_cli(capsys, train_argv(data, tmp_path / "r2", "--json", "--resume", epochs=2))
    assert code == 130 and "the same command with --resume, instead of any --overwrite, continues" in err
    import sanet.cli.evaluate as cli_eval

    monkeypatch.setattr(cli_eval, "run", interrupt)  # eval has nothing to resume: no hint
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", "x.pt", "--data", str(data / "val")])
    assert code == 130 and err.strip() == "sanet eval: interrupted"
    assert json.loads(out) == {"error": json.loads(out)["error"], "command": "train"}
    assert json.loads(out)["error"].startswith("interrupted")


def test_only_rank_0_of_a_torchrun_job_says_how_to_go_on_after_ctrl_c(monkeypatch, tmp_path):
    """Rank 0 may have just put back a run that --overwrite moved aside: the others can't
    know whether --resume is right."""
    import argparse

    from sanet.cli import _interrupted

    exc = KeyboardInterrupt()
    args = argparse.Namespace(command="train", output=str(tmp_path))
    (tmp_path / "last.pt").write_bytes(b"")
    assert "--resume" in _interrupted(args, exc)
    monkeypatch.setenv("RANK", "1")
    assert _interrupted(args, exc) == "interrupted"


def test_ctrl_c_between_the_first_log_and_checkpoint_says_overwrite(tmp_path):
    """A run stopped after its first epoch's log.csv, before its last.pt: the folder now holds a
    run (the same command is refused), and there is nothing to resume."""
    import argparse

    from sanet.cli import _interrupted
    from sanet.engine.state import load_resume_checkpoint

    (tmp_path / "log.csv").write_text("epoch,train_loss\n1,2.0\n")
    msg = _interrupted(argparse.Namespace(command="train", output=str(tmp_path)), KeyboardInterrupt())
    assert "nothing to resume" in msg and "--overwrite starts afresh" in msg
    with pytest.raises(FileNotFoundError, match="stopped before its first checkpoint.*--overwrite instead of --resume"):
        load_resume_checkpoint(tmp_path, "sa_resnet_test", ["a", "b"])


def test_an_error_after_ctrl_c_is_reported_as_the_interruption(capsys, monkeypatch, data, tmp_path,
                                                               sigint_default):
    """Ctrl-C while DataLoader workers start: Python drops the KeyboardInterrupt there, the
    workers die of the signal and the loader raises RuntimeError. That is the interruption."""
    import os
    import signal

    import sanet.cli.evaluate as cli_eval

    def interrupted_then_failed(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # through sanet's handler, as a terminal's Ctrl-C
        except KeyboardInterrupt:
            pass  # dropped, as in a finalizer
        raise RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly")

    monkeypatch.setattr(cli_eval, "run", interrupted_then_failed)
    code, out, err = run_cli(capsys, ["eval", "--checkpoint", "x.pt", "--data", str(data / "val"), "--json"])
    assert code == 130 and err.strip() == "sanet eval: interrupted" and json.loads(out)["error"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the command

    def failed(args):  # without Ctrl-C the same error is a bug: its traceback is kept
        raise RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly")

    monkeypatch.setattr(cli_eval, "run", failed)
    with pytest.raises(RuntimeError):
        run_cli(capsys, ["eval", "--checkpoint", "x.pt", "--data", str(data / "val")])


def test_overlay_sets_data_settings_but_not_weights(capsys, tmp_path, data):
    """--model-kwargs pretrained_cfg_overlay is the way to train with other mean/std; eval and
    predict rebuild it from the checkpoint. Weight sources in it are refused."""
    from sanet.engine.modeling import load_for_inference

    overlay = "pretrained_cfg_overlay={'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)}"
    assert run_cli(capsys, train_argv(data, tmp_path / "r", "--model-kwargs", overlay))[0] == 0
    loaded = load_for_inference(None, checkpoint=tmp_path / "r" / "last.pt")
    assert tuple(loaded.model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    code, out, _ = run_cli(capsys, ["eval", "--checkpoint", str(tmp_path / "r" / "last.pt"),
                                    "--data", str(data / "val"), "--json"])
    assert code == 0 and json.loads(out)["images"] == 12
    for source in ("file", "url", "hf_hub_id"):
        code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r2", "--model-kwargs",
                                                  f"pretrained_cfg_overlay={{'{source}': 'x'}}"))
        assert code == 2 and f"not where weights come from ({source}): use --pretrained-file" in err
    code, _, err = run_cli(capsys, train_argv(data, tmp_path / "r2", "--model-kwargs", "pretrained_cfg_overlay=5"))
    assert code == 2 and "pretrained_cfg_overlay must be a dict literal" in err and "got 5" in err
    # fine-tuning keeps the overlay too (it is merged under the file's weights)
    assert run_cli(capsys, train_argv(data, tmp_path / "ft", "--model-kwargs", overlay, "--pretrained-file",
                                      str(tmp_path / "r" / "last.pt")))[0] == 0
    tuned = load_for_inference(None, checkpoint=tmp_path / "ft" / "last.pt")
    assert tuple(tuned.model.pretrained_cfg["std"]) == (0.25, 0.25, 0.25)


def test_unreadable_val_image_in_a_worker_is_one_line(capsys, tmp_path):
    """Validation inside sanet train with --workers 1: the worker's traceback was printed."""
    root = make_imagefolder(tmp_path / "d", per_class=4)
    bad = root / "val" / "c" / "001.png"
    bad.write_bytes(b"junk")
    code, _, err = run_cli(capsys, train_argv(root, tmp_path / "r", "--workers", "1"))
    assert code == 2 and f"cannot read image {bad}" in err
    assert "Traceback" not in err and "Caught" not in err and len(err.strip().splitlines()) == 1


def test_non_finite_validation_loss_stops_before_a_checkpoint(capsys, tmp_path, data, monkeypatch):
    """Finite weights whose eval-mode outputs overflow (BatchNorm running statistics): the
    epoch's top-1 is meaningless and must not become best.pt; JSON stays strict (null, no NaN)."""
    import sanet.engine.trainer as trainer

    real = trainer._validate
    for key, value, flags, words in (("val_loss", float("nan"), (), "validation loss is nan after epoch 1"),
                                     ("val_loss", float("inf"), (), "validation loss is inf"),
                                     ("val_loss_ema", float("nan"), ("--model-ema",), "EMA validation loss is nan")):
        monkeypatch.setattr(trainer, "_validate", lambda *a, k=key, v=value: dict(real(*a), **{k: v}))
        out_dir = tmp_path / f"r_{key}_{value}"
        code, out, err = run_cli(capsys, train_argv(data, out_dir, "--json", *flags))
        assert code == 2 and words in err
        assert not (out_dir / "best.pt").exists() and not (out_dir / "last.pt").exists()
        assert not (out_dir / "tb").exists()  # no events file with nothing in it
        json.loads(out)


def test_json_output_is_strict():
    import io
    from contextlib import redirect_stdout

    from sanet.cli.common import print_json

    buf = io.StringIO()
    with redirect_stdout(buf):
        print_json({"loss": float("nan"), "x": [float("inf"), 1.5], "top1": 10.0})
    assert json.loads(buf.getvalue(), parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == \
        {"loss": None, "x": [None, 1.5], "top1": 10.0}


def test_predict_under_torchrun_is_refused(capsys, trained_run, data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, ["predict", "--checkpoint", str(trained_run / "last.pt"),
                                    str(next((data / "val").rglob("*.png")))])
    assert code == 2 and "sanet predict runs in one process" in err


def test_sigterm_outside_torchrun_says_how_to_go_on(capsys, monkeypatch, data, tmp_path):
    """`kill` or a job scheduler's SIGTERM ended the process silently (exit 143, no --json
    object); it is reported as Ctrl-C is, with train's hint on how to go on."""
    import signal

    import sanet.cli.train as cli_train

    def stopped(args):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "last.pt").write_bytes(b"")  # an epoch was checkpointed
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli_train, "run", stopped)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, err = run_cli(capsys, train_argv(data, tmp_path / "run", "--json"))
    message = "stopped by SIGTERM (the same command with --resume, instead of any --overwrite, continues"
    assert code == 128 + signal.SIGTERM and message in err
    assert json.loads(out)["error"].startswith(message)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored after the command


def test_sigterm_under_torchrun_still_gives_rank_0s_json(capsys, monkeypatch, data):
    """torchrun stops the other processes with SIGTERM when one fails; Python's default ends
    the process silently, so rank 0's --json object was missing (eval's stdout was empty)."""
    import os
    import signal

    import sanet.cli.evaluate as cli_eval

    def stopped(args):
        os.kill(os.getpid(), signal.SIGTERM)  # as torchrun does
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli_eval, "run", stopped)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(capsys, ["eval", "--checkpoint", "x.pt", "--data", str(data / "val"), "--json"])
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err
    assert json.loads(out)["error"].startswith("stopped by SIGTERM: torchrun stops every process when one fails")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored after the command


def test_large_images_load_without_pillows_bomb_warning(tmp_path, monkeypatch):
    """Between Pillow's warning size and its limit an image is read quietly (Pillow printed
    its warning and source line per image); past the limit it is unreadable, named."""
    import warnings

    from PIL import Image

    from sanet.engine.images import load_rgb

    path = tmp_path / "big.png"
    Image.new("RGB", (16, 16)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256 pixels: warned (> 200), not refused (< 400)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_rgb(path).size == (16, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(path)


def test_the_command_prints_our_warnings_as_one_named_line(capsys, monkeypatch, data, recwarn):
    """A warning of ours (e.g. --model-kwargs sa_groups=48 fitting none of a model's SA layers)
    would point at the console script's sys.exit(main()): the command names itself instead.
    Other warnings keep Python's format, and -W error still turns ours into an error."""
    import warnings

    import sanet.cli.evaluate as cli_eval
    from sanet import SanetWarning
    from sanet.errors import warn_user

    def warns(args):
        warn_user("sa_groups=48 fits none of its SA layers")
        warnings.warn("not ours", DeprecationWarning)
        return 0

    monkeypatch.setattr(cli_eval, "run", warns)
    argv = ["eval", "--checkpoint", "x.pt", "--data", str(data / "val")]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, argv)
    assert code == 0 and "sanet eval: warning: sa_groups=48 fits none of its SA layers\n" in err
    assert "not ours" not in err and "SanetWarning" not in err
    # passed on to the warning machinery as before (here pytest's record)
    assert [str(w.message) for w in recwarn if w.category is DeprecationWarning] == ["not ours"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SanetWarning)
        with pytest.raises(SanetWarning, match="sa_groups=48"):
            run_cli(capsys, argv)
