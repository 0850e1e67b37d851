"""Options and paths users get wrong: each is refused up front with a message naming the
option (or file) and what is valid, never a traceback or a message blaming a good image."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from engine_utils import make_imagefolder, run_cli, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("flags,named", [
    (["--drop-path", "2"], "--drop-path must be in [0, 1)"),
    (["--drop-path", "-1"], "--drop-path must be in [0, 1)"),
    (["--lr-base", "0"], "--lr-base must be positive"),
    (["--lr-base", "-1"], "--lr-base must be positive"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--decay-epochs", "inf"], "--decay-epochs must be a finite number"),
    (["--scale", "0.1", "inf"], "--scale must be a finite number"),
    (["--color-jitter", "-1"], "--color-jitter must be 0 (off) or more"),
    (["--aa", "foo"], "--aa 'foo' is not a policy timm knows"),
    (["--aa", "rand-mX"], "section 'mX' is not one timm's rand policy reads"),  # timm skipped it
    (["--aa", "rand-m9-q3"], "section 'q3' is not one timm's rand policy reads"),  # timm: assert only
    (["--aa", "augmix-m5-z2"], "section 'z2' is not one timm's augmix policy reads"),
    (["--crop-pct", "100"], "crop_pct 100 (--crop-pct, else the training run's or the model's) with image "
                            "size 16 resizes images to 0 pixels"),
])
def test_bad_training_options_are_refused_before_the_run(capsys, tmp_path, data, flags, named):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, train_argv(data, out, "--json", *flags))
    assert code == 2 and named in err, err
    assert named in json.loads(stdout)["error"]
    assert not out.exists()  # refused before the run folder was made


def test_good_aa_policies_pass_and_reach_the_transform():
    from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment

    from sanet.engine.config import _check_aa_policy
    from sanet.engine.data import build_transform

    cfg = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    for policy, kind in (("rand-m9-mstd0.5-inc1", RandAugment), ("augmix-m5-w4-d2", AugMixAugment),
                         ("original", AutoAugment), ("v0", AutoAugment)):
        _check_aa_policy(policy)  # accepted
        steps = build_transform(cfg, is_training=True, aug=dict(auto_augment=policy)).transforms
        assert any(isinstance(t, kind) for t in steps), (policy, steps)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_crop_pct_too_large_names_the_option_not_the_image(capsys, trained_run, data, command):
    ckpt = ["--checkpoint", str(trained_run / "last.pt"), "--crop-pct", "100"]
    target = ["--data", str(data / "val"), "--workers", "0"] if command == "eval" else \
        [str(next((data / "val" / "a").iterdir()))]
    code, _, err = run_cli(capsys, [command, *ckpt, *target])
    assert code == 2 and "crop_pct 100 (--crop-pct" in err and "cannot read image" not in err, err


def test_eval_names_the_bad_number(capsys, trained_run, data):
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", str(trained_run / "last.pt"), "--batch-size", "0", "--data", str(data / "val")])
    assert code == 2 and "--batch-size must be at least 1, got 0" in err
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", str(trained_run / "last.pt"), "--workers", "-1", "--data", str(data / "val")])
    assert code == 2 and "--workers must be 0 or more, got -1" in err


def test_a_folder_given_as_a_checkpoint_says_so(capsys, trained_run, data):
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", str(trained_run), "--data", str(data / "val")])
    assert code == 2 and "is a folder, not a checkpoint file" in err and "last.pt" in err
    code, _, err = run_cli(capsys, ["convert", str(trained_run), str(trained_run.parent / "x.safetensors"), "--model", "sa_resnet_test"])
    assert code == 2 and "is a folder" in err


def test_atomic_write_to_a_folder_names_it_not_a_temporary_file(tmp_path):
    from sanet.checkpoint import atomic_write

    with pytest.raises(IsADirectoryError, match="it is a folder") as info:
        atomic_write(tmp_path, lambda tmp: open(tmp, "w").close())
    assert ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_convert_refuses_to_write_over_its_input(capsys, trained_run, tmp_path):
    src = tmp_path / "w.safetensors"
    assert run_cli(capsys, ["convert", str(trained_run / "last.pt"), str(src), "--model", "sa_resnet_test"])[0] == 0
    before = src.read_bytes()
    code, _, err = run_cli(capsys, ["convert", str(src), str(src), "--model", "sa_resnet_test"])
    assert code == 2 and "is the input file" in err and src.read_bytes() == before
    code, _, err = run_cli(capsys, ["convert", str(src), str(tmp_path / "v.safetensors"), "--model",
                                    "sa_resnet_test", "--num-classes", "-1"])
    assert code == 2 and "--num-classes must be 0 (no classifier) or more, got -1" in err


@pytest.mark.parametrize("flags,named", [
    (["--skip-layers", "--skip-models"], "leave nothing to time"),
    (["--shapes", "--skip-models"], "--shapes needs at least one"),
])
def test_bench_refuses_a_run_that_times_nothing(capsys, flags, named):
    code, stdout, err = run_cli(capsys, ["bench", "--json", *flags])
    assert code == 2 and named in err and named in json.loads(stdout)["error"]


@pytest.mark.parametrize("flags,named", [
    # found after the first shape's timing, the results were lost
    (["--skip-models", "--shapes", "2x8x4x4", "2x3x4x4"], "the channel count (the 2nd dim, 3) must be even"),
    (["--skip-models", "--shapes", "2x8x4x4", "--output", "."], "--output . is a folder"),
    (["--skip-layers", "--model", "sa_resnet50.authors_in1k", "--baseline", "sa_resnet50"],
     "are the same architecture"),
    (["--skip-layers", "--model", "sa_resnet_test", "--baseline", "vit_tiny_patch16_224", "--img-size", "32"],
     "takes only 224x224 input; pass --img-size 224"),
    (["--skip-layers", "--model", "sa_resnet_test", "--baseline", "resnet18", "--batch-size", "1", "--img-size",
      "32"], "leaves one value per channel in the last stage's BatchNorm"),
])
def test_bench_refuses_bad_inputs_before_timing_anything(capsys, monkeypatch, flags, named):
    import sanet.analysis.bench as bench

    monkeypatch.setattr(bench, "time_interleaved", lambda *a, **k: pytest.fail("timed before the check"))
    code, stdout, err = run_cli(capsys, ["bench", "--json", *flags])
    assert code == 2 and named in err and named in json.loads(stdout)["error"]


def test_bench_baseline_without_a_classifier_gets_the_same_head(capsys):
    """timm models with num_classes=0 (e.g. DINO weights' configs) returned features, and the
    loss against 1000-class targets failed with an IndexError."""
    import timm

    from sanet.analysis.bench import model_bench

    headless = "vit_small_patch16_224.dino"
    assert timm.create_model(headless, img_size=32, patch_size=16).num_classes == 0
    res = model_bench({"sa": {"model": "sa_resnet_test"}, "vit": {"model": headless, "img_size": 32}},
                      batch_size=8, img_size=32, rounds=1)  # 8 targets: one >= 384 (vit-s width)
    assert res["memory"]["vit"]["saved_bytes"] > 0


def test_bench_out_of_memory_names_the_sizes_of_bench(capsys, monkeypatch):
    import sanet.analysis.bench as bench

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    monkeypatch.setattr(bench, "layer_bench", oom)
    code, _, err = run_cli(capsys, ["bench", "--skip-models", "--shapes", "2x8x4x4"])
    assert code == 2 and "out of memory" in err and "smaller --shapes (layers)" in err


def test_abbreviated_options_are_refused(capsys):
    """argparse takes "--jso" for "--json" by default; the JSON error object looks for the
    full flag, and a prefix can become ambiguous when a flag is added."""
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, ["models", "--jso"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "sanet models: error: unrecognized arguments: --jso (did you mean --json?)" in err
    assert err.startswith("usage: sanet models [-h]")  # the subcommand's usage, which lists its options


@pytest.mark.parametrize("argv, tail", [
    (["--epoch", "2"], "--epoch 2 (did you mean --epochs?)"),
    (["--lrr=0.1", "--epoch", "2"], "--lrr=0.1 --epoch 2 (did you mean --lr for --lrr, --epochs for --epoch?)"),
    (["-epochs", "2"], "-epochs 2 (did you mean --epochs?)"),  # one dash, as some tools spell long options
    (["--colour", "x"], "--colour x"),  # nothing close: no guess
    (["-q"], "-q"),  # a short option: no guess from one letter
    (["stray"], "stray")])
def test_a_mistyped_option_gets_the_closest_one(capsys, argv, tail):
    with pytest.raises(SystemExit):
        run_cli(capsys, ["train", "--model", "m", "--data", "d", "--output", "o", *argv])
    assert capsys.readouterr().err.rstrip().endswith(f"sanet train: error: unrecognized arguments: {tail}")


def test_memory_error_is_out_of_memory_not_a_bad_image(tmp_path, monkeypatch):
    from sanet.engine import predict
    from sanet.errors import is_out_of_memory

    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(ValueError("x"))
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)

    def no_memory(path):
        raise MemoryError()

    monkeypatch.setattr(predict, "load_rgb", no_memory)
    with pytest.raises(MemoryError):
        predict.read_images([img], transform=lambda im: torch.zeros(3))


def test_a_bare_memory_error_is_reported_as_out_of_memory(capsys, monkeypatch):
    """Python's MemoryError has no message (the description took its first line)."""
    from sanet.cli import models_cmd

    def no_memory(args):
        raise MemoryError()

    monkeypatch.setattr(models_cmd, "run", no_memory)
    code, stdout, err = run_cli(capsys, ["models", "--json"])
    assert code == 2 and "out of memory (MemoryError)" in err
    assert "out of memory" in json.loads(stdout)["error"]


def test_the_stem_check_compares_with_the_model_not_with_3(tmp_path):
    """Some RGB models' stems take more than 3 channels (TResNet's, after space-to-depth)."""
    from torch import nn

    from sanet.engine.modeling import _check_rgb_stem
    from sanet.errors import SanetError

    model = nn.Module()
    model.stem = nn.Conv2d(48, 8, 3)
    model.pretrained_cfg = {"first_conv": "stem"}
    _check_rgb_stem({"stem.weight": torch.zeros(8, 48, 3, 3)}, model, "m", tmp_path / "f.pth")
    with pytest.raises(SanetError, match="takes 16-channel input in this file, 48 in the model"):
        _check_rgb_stem({"stem.weight": torch.zeros(8, 16, 3, 3)}, model, "m", tmp_path / "f.pth")


def test_a_transform_error_is_not_reported_as_an_unreadable_image(tmp_path):
    from sanet.engine.predict import read_images

    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)

    def broken(image):
        raise ValueError("transform failed")

    with pytest.raises(ValueError, match="^transform failed$"):
        read_images([img], broken)


def test_worker_tracebacks_are_cut_from_every_error():
    from sanet.cli import _describe

    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                         "call last):\n  File \"x.py\", line 1, in f\nValueError: height and width must be > 0\n")
    assert _describe(wrapped) == "height and width must be > 0"


def test_hidden_files_are_not_images(tmp_path):
    """macOS copies leave ._name.png (AppleDouble metadata) beside each image."""
    from sanet.engine.data import open_image_folder

    root = make_imagefolder(tmp_path / "d", per_class=2) / "train"
    (root / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = open_image_folder(root, what="training")
    assert all("._" not in p for p, _ in ds.samples) and len(ds) == 6


def test_float_images_are_refused_not_clipped(tmp_path):
    from sanet.engine.images import load_rgb

    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="floating-point"):
        load_rgb(tmp_path / "f.tif")


@pytest.fixture()
def nan_weights(trained_run, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(trained_run / "last.pt", weights_only=True)["model"]
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path), metadata={"model": "sa_resnet_test", "sanet_version": "0"})  # as sanet convert marks it
    return path


def test_eval_reports_no_score_for_nan_outputs(capsys, nan_weights, data):
    """NaN logits still rank somewhere: the run used to print a top-1 of 33% and exit 0."""
    code, stdout, err = run_cli(capsys, ["eval", "--pretrained-file", str(nan_weights), "--data", str(data / "val"),
                                         "--workers", "0", "--json"])
    assert code == 2 and "NaN or inf for 12 of 12 images" in err, err
    assert "top1" not in json.loads(stdout)


def test_predict_refuses_nan_outputs(capsys, nan_weights, data):
    image = str(next((data / "val" / "a").iterdir()))
    code, stdout, err = run_cli(capsys, ["predict", "--pretrained-file", str(nan_weights), image])
    assert code == 2 and "NaN or inf" in err and "nan%" not in stdout


def test_eval_and_predict_refuse_a_model_for_other_channel_counts(capsys, tmp_path, data):
    import timm

    path = tmp_path / "gray.pth"
    torch.save(timm.create_model("sa_resnet_test", in_chans=1, num_classes=3).state_dict(), path)
    image = str(next((data / "val" / "a").iterdir()))
    for argv in (["eval", "--data", str(data / "val")], ["predict", image]):
        code, _, err = run_cli(capsys, [*argv, "--model", "sa_resnet_test", "--pretrained-file", str(path)])
        assert code == 2 and "takes 1-channel input" in err and "in_chans=1" in err, err


def test_a_part_of_the_model_is_named_as_such(tmp_path):
    """Weights of a features_only model with fewer stages are not "another architecture"."""
    import timm

    from sanet.models import CheckpointMismatchError

    part = timm.create_model("sa_resnet_test", features_only=True, out_indices=(1, 2))
    torch.save(part.state_dict(), tmp_path / "part.pth")
    with pytest.raises(CheckpointMismatchError, match="holds no layer3, layer4 at all, only part of the model"):
        timm.create_model("sa_resnet_test", features_only=True, out_indices=(1, 2, 3), pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "part.pth")))


# ------------------------------------------------ eval / predict / convert with converted files

def test_a_converted_file_converts_again_with_its_records(capsys, trained_run, data, tmp_path):
    """Converting a .safetensors that sanet convert wrote kept only the weights: class names,
    image size, crop and model kwargs were lost, and eval's scores changed."""
    from sanet.checkpoint import safetensors_metadata

    first, again = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_cli(capsys, ["convert", str(trained_run / "last.pt"), str(first), "--model", "sa_resnet_test"])[0] == 0
    assert run_cli(capsys, ["convert", str(first), str(again), "--model", "sa_resnet_test"])[0] == 0
    kept = {k: v for k, v in safetensors_metadata(first).items() if k != "source"}
    assert "class_names" in kept and "img_size" in kept and kept["weights"] == "model"
    assert {k: v for k, v in safetensors_metadata(again).items() if k != "source"} == kept
    scores = []
    for path in (first, again):
        code, out, _ = run_cli(capsys, ["eval", "--pretrained-file", str(path), "--data", str(data / "val"), "--json"])
        assert code == 0
        scores.append({k: json.loads(out)[k] for k in ("top1", "top5", "loss", "images")})
    assert scores[0] == scores[1]
    # what the file records is checked against --model, and --ema is answered with what it holds
    code, _, err = run_cli(capsys, ["convert", str(first), str(tmp_path / "c.safetensors"), "--model", "sa_resnet50"])
    assert code == 2 and "says it holds sa_resnet_test weights; pass --model sa_resnet_test" in err
    code, _, err = run_cli(capsys, ["eval", "--pretrained-file", str(first), "--model", "sa_resnet50",
                                    "--data", str(data / "val")])
    assert code == 2 and "says it holds sa_resnet_test weights" in err
    code, _, err = run_cli(capsys, ["eval", "--pretrained-file", str(first), "--ema", "--data", str(data / "val")])
    assert code == 2 and "holds its run's model weights (converted without --ema)" in err


def test_convert_refuses_a_model_card_path_that_is_the_input(capsys, trained_run, tmp_path):
    source = tmp_path / "in.json"  # OUT.json is where the card goes
    source.write_bytes((trained_run / "last.pt").read_bytes())
    before = source.read_bytes()
    code, _, err = run_cli(capsys, ["convert", str(source), str(tmp_path / "in.safetensors"), "--model",
                                    "sa_resnet_test"])
    assert code == 2 and "the model card" in err and "is the input file" in err
    assert source.read_bytes() == before


def test_a_pickle_protocol_torch_cannot_read_safely_is_named_not_called_unsafe(capsys, tmp_path):
    import timm

    path = tmp_path / "p4.pt"
    torch.save({"state_dict": timm.create_model("sa_resnet_test").state_dict()}, path, pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own note about the protocol is not passed on
        code, _, err = run_cli(capsys, ["convert", str(path), str(tmp_path / "o.safetensors"), "--model",
                                        "sa_resnet_test"])
    assert code == 2 and "a pickle of protocol 4" in err and "could run code" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_eval_and_predict_say_what_is_wrong_with_the_paths(capsys, trained_run, data, tmp_path):
    ckpt = ["--checkpoint", str(trained_run / "last.pt")]
    loose = tmp_path / "loose"
    loose.mkdir()
    image = next((data / "val").rglob("*.png"))
    (loose / "x.png").write_bytes(image.read_bytes())
    code, _, err = run_cli(capsys, ["eval", *ckpt, "--data", str(loose)])
    assert code == 2 and "holds images (x.png, ...) but no class folders" in err
    code, _, err = run_cli(capsys, ["eval", *ckpt, "--data", str(image)])
    assert code == 2 and "is a file" in err and "sanet predict" in err
    code, _, err = run_cli(capsys, ["predict", *ckpt, str(tmp_path / "none*.png")])
    assert code == 2 and "a shell pattern that matched no file" in err
    (tmp_path / "notes.png").write_text("not an image")
    code, _, err = run_cli(capsys, ["predict", *ckpt, str(tmp_path / "notes.png")])
    assert code == 2 and "not in an image format Pillow can read" in err and "BufferedReader" not in err
