"""Edges of ``sanet train``'s option checks, the ImageFolder error messages and the loaders
that the rest of the suite crosses only from one side: each check is tested at both sides of
its bound, so a bound moved by one (``<`` for ``<=``) or a check dropped is caught."""
from __future__ import annotations

import re

import pytest
import torch

from engine_utils import make_imagefolder, parse_train_args

pytestmark = pytest.mark.usefixtures("one_thread")


# --- option bounds ----------------------------------------------------------------------------

#: (flags, the option named in the error): just outside each bound.
_REFUSED = [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--drop-path", "1"], "--drop-path must be in [0, 1)"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--accum-steps", "0"], "--accum-steps must be at least 1"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--img-size", "7"], "--img-size must be in [8, 4096] pixels"),
    (["--img-size", "4097"], "--img-size must be in [8, 4096] pixels"),
    (["--lr", "0"], "--lr must be positive"),
    (["--weight-decay", "-0.001"], "--weight-decay must be 0 or more"),
    (["--smoothing", "1"], "--smoothing must be in [0, 1)"),
    (["--hflip", "1.001"], "--hflip must be a probability in [0, 1]"),
    (["--hflip", "-0.001"], "--hflip must be a probability in [0, 1]"),
    (["--model-ema-decay", "1"], "--model-ema-decay must be in (0, 1)"),
    (["--model-ema-decay", "0"], "--model-ema-decay must be in (0, 1)"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32)"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--scale", "0.5", "0.4"], "--scale must be 0 < MIN <= MAX <= 1"),
    (["--scale", "0", "1"], "--scale must be 0 < MIN <= MAX <= 1"),
    (["--scale", "0.5", "1.01"], "--scale must be 0 < MIN <= MAX <= 1"),
    (["--ratio", "0", "1"], "--ratio must be 0 < MIN <= MAX"),
    (["--ratio", "2", "1"], "--ratio must be 0 < MIN <= MAX"),
    (["--ratio", "1", "inf"], "--ratio must be a finite number"),  # passes 0 < MIN <= MAX
    (["--crop-pct", "0.2499"], "--crop-pct must be at least 0.25"),
    (["--lr-base-size", "0"], "--lr-base-size must be at least 1"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--decay-epochs", "0"], "--decay-epochs must be positive"),
    (["--decay-rate", "0"], "--decay-rate must be in (0, 1]"),
    (["--decay-rate", "1.01"], "--decay-rate must be in (0, 1]"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be 0 or more"),
    (["--warmup-lr", "-1"], "--warmup-lr must be 0 or more"),
    (["--min-lr", "-1"], "--min-lr must be 0 or more"),
    (["--clip-grad", "0"], "--clip-grad must be positive"),
    (["--mixup", "-1"], "--mixup must be 0 (off) or a positive alpha"),
    (["--cutmix", "-1"], "--cutmix must be 0 (off) or a positive alpha"),
    (["--mixup-prob", "1.01"], "--mixup-prob must be a probability in [0, 1]"),
    (["--mixup-switch-prob", "1.01"], "--mixup-switch-prob must be a probability in [0, 1]"),
    (["--reprob", "1.01"], "--reprob must be a probability in [0, 1]"),
    (["--cutmix", "1", "--batch-size", "3"], "--mixup/--cutmix pair images within a batch: --batch-size must be even"),
    (["--mixup", "1", "--batch-size", "3"], "--mixup/--cutmix pair images within a batch: --batch-size must be even"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
]


@pytest.mark.parametrize("flags, named", _REFUSED, ids=[" ".join(flags) for flags, _ in _REFUSED])
def test_each_option_is_refused_just_outside_its_bound(flags, named):
    from sanet.engine.config import validate_train_args

    with pytest.raises(ValueError, match="^" + re.escape(named)):
        validate_train_args(parse_train_args(*flags))


def test_every_option_is_accepted_at_its_bounds():
    """The values on each bound itself (and the defaults with them) pass."""
    from sanet.engine.config import validate_train_args

    for flags in (["--epochs", "1", "--drop-path", "0", "--batch-size", "2", "--accum-steps", "1", "--workers", "0",
                   "--img-size", "8", "--weight-decay", "0", "--smoothing", "0", "--hflip", "0", "--seed", "0",
                   "--scale", "1", "1", "--ratio", "1", "1", "--crop-pct", "0.25", "--lr-base-size", "1",
                   "--momentum", "0", "--decay-rate", "1", "--warmup-epochs", "0", "--warmup-lr", "0",
                   "--min-lr", "0", "--mixup-prob", "0", "--mixup-switch-prob", "0", "--reprob", "0"],
                  ["--img-size", "4096", "--hflip", "1", "--seed", str(2**32 - 1), "--scale", "0.01", "1",
                   "--mixup-prob", "1", "--mixup-switch-prob", "1", "--reprob", "1", "--mixup", "0.2",
                   "--cutmix", "1", "--batch-size", "2"]):
        args = parse_train_args(*flags)
        validate_train_args(args)  # no error


@pytest.mark.parametrize("kwarg, hint", [
    ("num_classes=5", "the class folders of --data set it"),
    ("drop_path_rate=0.1", "use --drop-path"),
    ("pretrained=True", "use --pretrained-file FILE (nothing is downloaded)"),
    ("pretrained_cfg={}", "use --pretrained-file FILE"),
    ("checkpoint_path=x.pth", "use --pretrained-file FILE"),
    ("features_only=True", "sanet train trains a classifier"),
])
def test_model_kwargs_owned_by_other_options_are_refused(kwarg, hint):
    from sanet.engine.config import validate_train_args

    validate_train_args(parse_train_args("--model-kwargs", "sa_groups=2"))  # a free one passes
    key = kwarg.split("=")[0]
    with pytest.raises(ValueError, match=f"^--model-kwargs may not set {key}: {re.escape(hint)}"):
        validate_train_args(parse_train_args("--model-kwargs", kwarg))


def test_a_compile_mode_turns_compile_on_in_the_saved_arguments():
    from sanet.engine.config import plain_args, validate_train_args

    args = parse_train_args()
    validate_train_args(args)
    assert args.compile is False
    args = parse_train_args("--compile-mode", "max-autotune")
    validate_train_args(args)
    assert plain_args(args)["compile"] is True and plain_args(args)["compile_mode"] == "max-autotune"


# --- ImageFolder messages ---------------------------------------------------------------------

def test_loose_images_beside_only_empty_class_folders_are_named(tmp_path):
    """Every class folder empty is not "some classes lack images": the images are beside them."""
    from sanet.engine.data import open_image_folder

    (tmp_path / "a").mkdir()
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds images \(x\.png, \.\.\.\) but no class folders"):
        open_image_folder(tmp_path, "training")
    (tmp_path / "x.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"is empty or holds no images"):
        open_image_folder(tmp_path, "training")


def test_skip_bad_images_skips_in_val_as_in_train(tmp_path):
    """--skip-bad-images covers both splits: an unreadable val image is a None sample (dropped
    and counted by collate_skip), not an error that ends the run at its first validation."""
    from torchvision.transforms import ToTensor

    from sanet.engine.data import UnreadableImageError, collate_skip, open_train_val

    data = make_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=2)
    for split in ("train", "val"):
        (data / split / "a" / "zz_bad.png").write_bytes(b"not an image")
    train, val = open_train_val(data, skip_bad=True)
    for ds in (train, val):
        ds.transform = ToTensor()
        bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("zz_bad.png")]
        assert len(bad) == 1 and ds[bad[0]] is None
        images, targets, skipped = collate_skip([ds[i] for i in range(len(ds))])
        assert skipped == 1 and len(images) == len(targets) == len(ds) - 1
    _, val = open_train_val(data)
    with pytest.raises(UnreadableImageError, match="cannot read image .*zz_bad.png"):
        val[[p for p, _ in val.samples].index(str(data / "val" / "a" / "zz_bad.png"))]


def test_the_eval_resize_of_a_non_square_input_is_checked_on_its_short_side():
    """timm resizes each side to floor(side / crop_pct): the short side reaches 0 first."""
    from sanet.engine.data import check_eval_resize

    check_eval_resize({"input_size": (3, 16, 200), "crop_pct": 16})  # 16 / 16: 1 pixel
    with pytest.raises(ValueError, match=r"crop_pct 20 .* with image size 16 resizes images to 0 pixels"):
        check_eval_resize({"input_size": (3, 16, 200), "crop_pct": 20})  # 200 / 20 = 10, 16 / 20 = 0
    with pytest.raises(ValueError, match=r"with image size 16 resizes images to 0 pixels"):
        check_eval_resize({"input_size": (3, 200, 16), "crop_pct": 20})


@pytest.mark.parametrize("skip_bad", [False, True])
def test_out_of_memory_while_decoding_is_not_a_bad_image(tmp_path, skip_bad):
    """MemoryError is the machine's limit: neither skipped and counted as an unreadable file
    nor reported as one."""
    from sanet.engine.data import open_image_folder

    ds = open_image_folder(make_imagefolder(tmp_path / "d", classes=("a",), splits={"val": 2}) / "val",
                           "evaluation", skip_bad=skip_bad)

    def no_memory(path):
        raise MemoryError()

    ds.loader = no_memory
    with pytest.raises(MemoryError):
        ds[0]


def test_data_given_as_one_split_points_at_its_parent(tmp_path):
    """--data DATA/train (a split, not the dataset) names the folder to give instead."""
    from sanet.engine.data import open_train_val

    data = make_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=2)
    for split in ("train", "val"):
        with pytest.raises(FileNotFoundError, match=rf"is the {split}/ split of a dataset; give the folder that "
                                                    rf"holds train/ and val/: --data {re.escape(str(data))}$"):
            open_train_val(data / split)
    train, val = open_train_val(data)
    assert train.classes == val.classes == ["a", "b"]


# --- loaders ----------------------------------------------------------------------------------

class _RandomSamples(torch.utils.data.Dataset):
    """Samples drawn from the loading process's torch generator (a dataset that is not a
    SafeImageFolder, so reseed_loader can't seed each sample: only the loader's generator,
    which seeds the workers, makes them repeat)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return torch.rand(1), index


def test_reseeding_a_used_loader_repeats_the_epochs_worker_randomness():
    from sanet.engine.data import build_train_loader, reseed_loader
    from sanet.engine.distributed import DistContext

    def epoch_values(loader, epoch):
        reseed_loader(loader, epoch, seed=3)
        return [(x.flatten().tolist(), t.tolist()) for x, t, _ in loader]

    fresh = build_train_loader(_RandomSamples(), 2, workers=1, ctx=DistContext(), seed=3)
    used = build_train_loader(_RandomSamples(), 2, workers=1, ctx=DistContext(), seed=3)
    epoch_values(used, 0)  # a resumed run's loader has not been through the earlier epochs
    assert epoch_values(used, 1) == epoch_values(fresh, 1)
    assert epoch_values(fresh, 2) != epoch_values(used, 1)


@pytest.mark.parametrize("is_training", [True, False])
def test_the_transform_takes_size_interpolation_crop_and_normalisation_from_the_data_config(is_training):
    """Not timm's ImageNet defaults: a model's (or an overlay's) mean/std, interpolation and
    crop_pct reach the transform that feeds it."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

    from sanet.engine.data import build_transform

    cfg = dict(input_size=(3, 20, 20), interpolation="box", crop_pct=0.5, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    steps = build_transform(cfg, is_training=is_training).transforms
    norm = [t for t in steps if isinstance(t, Normalize)]
    assert len(norm) == 1 and list(norm[0].mean) == pytest.approx([0.1, 0.2, 0.3])
    assert list(norm[0].std) == pytest.approx([0.4, 0.5, 0.6])
    if is_training:
        crop = [t for t in steps if "RandomResizedCrop" in type(t).__name__]  # timm's subclass
        assert len(crop) == 1 and tuple(crop[0].size) == (20, 20)
        assert crop[0].interpolation in (InterpolationMode.BOX, "box")
    else:
        resize, crop = steps[0], steps[1]
        assert isinstance(resize, Resize) and isinstance(crop, CenterCrop)
        assert resize.interpolation == InterpolationMode.BOX and resize.size == 40  # 20 / crop_pct 0.5
        assert tuple(crop.size) == (20, 20)
    out = build_transform(cfg, is_training=is_training)(Image.new("RGB", (30, 30)))  # black: -mean / std
    assert out.shape == (3, 20, 20)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([-0.1 / 0.4, -0.2 / 0.5, -0.3 / 0.6]))


def test_more_workers_than_cpus_is_said_once_naming_the_option(capsys, monkeypatch):
    """PyTorch warned twice per loader (built, then iterated) without naming --workers."""
    import os
    import warnings

    import sanet.engine.data as data_mod
    from sanet.engine.distributed import DistContext

    monkeypatch.setattr(data_mod, "_WORKERS_NOTED", {"said": False})
    cpus = len(os.sched_getaffinity(0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        within = data_mod.build_eval_loader(_RandomSamples(), 2, workers=cpus, ctx=DistContext())
        assert capsys.readouterr().err == ""
        for _ in range(2):  # the trainer's two loaders
            loader = data_mod.build_eval_loader(_RandomSamples(), 2, workers=cpus + 1, ctx=DistContext())
            assert len(list(loader)) == 2
        assert len(list(within)) == 2
    err = capsys.readouterr().err
    assert err == (f"warning: --workers {cpus + 1} is more than the {cpus} CPU(s) this process may use: loading "
                   f"images may get slower, not faster (--workers {cpus} or fewer)\n")
    assert not [w for w in seen if "DataLoader will create" in str(w.message)]
