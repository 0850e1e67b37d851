"""ImageFolder datasets, timm transforms and (distributed) loaders, with clear errors.

Data order and augmentation are functions of ``(seed, epoch)`` only: the train sampler is
always torchvision's ``DistributedSampler`` (one replica when not distributed), the loader's
generator is reseeded every epoch, and each sample's augmentation runs on generators seeded
from ``(seed, epoch, index)``, whichever worker loads it. That is what makes an epoch-boundary
resume reproduce an uninterrupted run, with any ``--workers``.
"""
from __future__ import annotations

import os
import random
import sys
import unicodedata
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder

from ..errors import SanetError
from .config import MAX_IMG_SIZE, MIN_CROP_PCT
from .distributed import DistContext
from .images import IMAGE_EXTENSIONS, is_image_file, load_rgb

__all__ = [
    "SafeImageFolder",
    "UnreadableImageError",
    "open_image_folder",
    "open_train_val",
    "check_same_classes",
    "build_transform",
    "build_train_loader",
    "build_eval_loader",
    "clean_worker_error",
    "collate_skip",
    "reseed_loader",
    "check_eval_resize",
]


class UnreadableImageError(SanetError):
    """An image file could not be decoded."""


def clean_worker_error(exc: BaseException) -> str:
    """The message of an error re-raised by a DataLoader worker, without the worker traceback."""
    msg = str(exc)
    if "Original Traceback" not in msg:
        return msg
    last = [line for line in msg.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` whose decode errors name the file, or are skipped and counted.

    Hand-written because ImageFolder raises PIL's bare error (no path) from deep inside a
    worker. With ``skip_bad=True`` a bad sample comes back as ``None`` and
    :func:`collate_skip` drops it from the batch and counts it.
    """

    def __init__(self, root: str, transform=None, skip_bad: bool = False) -> None:
        super().__init__(root, transform=transform, loader=load_rgb, is_valid_file=is_image_file)
        self.skip_bad = skip_bad
        # (seed, epoch), set per epoch by reseed_loader: each sample's augmentation then draws
        # from its own generators, seeded from (seed, epoch, index), so it does not depend on
        # which worker (or how many) loads it. None: the transform uses the process's generators.
        self.aug_seed: Optional[Tuple[int, int]] = None

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        """torchvision's, without hidden folders (``.ipynb_checkpoints``, ``.DS_Store``-style
        tool folders): their files are ignored as hidden files are, not taken as a class."""
        classes = sorted(e.name for e in os.scandir(directory) if _is_class_folder(e))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str, class_to_idx: Dict[str, int], extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        """torchvision's, walking each folder once and skipping hidden folders: it follows
        links to folders (as torchvision does), but a link back to a folder already walked
        (``cat/loop -> .``) is not walked again. torchvision's walk took the folder's images
        once per level until the path grew too long: 2 images were counted 42 times."""
        if extensions is not None or is_valid_file is None:
            raise ValueError("SafeImageFolder selects files with is_valid_file only")
        instances, found = [], set()
        for name in sorted(class_to_idx):
            target_dir = os.path.join(directory, name)
            if not os.path.isdir(target_dir):
                continue
            seen, walked = set(), []
            for root, dirs, files in os.walk(target_dir, followlinks=True, onerror=_unlistable):
                seen.add(os.path.realpath(root))
                # hidden folders (thumbnail caches such as .thumbnails) hold no samples, as hidden files don't
                dirs[:] = [d for d in dirs if not d.startswith(".")
                           and os.path.realpath(os.path.join(root, d)) not in seen]
                walked.append((root, files))
            for root, files in sorted(walked):
                for fname in sorted(files):
                    path = os.path.join(root, fname)
                    if is_valid_file(path):
                        instances.append((path, class_to_idx[name]))
                        found.add(name)
        empty = set(class_to_idx) - found
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. "
                                    f"Supported extensions are: {', '.join(IMAGE_EXTENSIONS)}")
        return instances

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except MemoryError:  # the machine's limit, not the file's fault: reported as out of memory
            raise
        except Exception as exc:  # PIL raises several types (OSError, UnidentifiedImageError, ...)
            if self.skip_bad:
                return None
            raise UnreadableImageError(
                f"cannot read image {path}: {type(exc).__name__}: {exc} "
                "(pass --skip-bad-images to skip and count unreadable files)") from None
        if self.transform is not None:
            if self.aug_seed is None:
                sample = self.transform(sample)
            else:
                with _seeded(_sample_seed(*self.aug_seed, index)):
                    sample = self.transform(sample)
        return sample, target


def _unlistable(exc: OSError) -> None:
    """os.walk's default skips a folder it can't list, and its images silently with it."""
    raise SanetError(f"cannot list the folder {exc.filename}: {exc.strerror or exc}; its images would be "
                     "left out (every class folder, and the folders in it, must be readable)") from exc


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed per (run seed, epoch, image): Python's tuple hash of ints, which is the
    same in every process (string hashing is what PYTHONHASHSEED salts). Not an affine mix,
    where image i of one epoch would reuse the seed of image i + k of the previous one."""
    return hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch (CPU), Python and NumPy generators seeded for a block: timm's and torchvision's
    transforms draw from all three. In the main process (``--workers 0``) their states are
    restored afterwards, since the training step draws from them too (mixup, drop path); a
    worker's are its own. (torch.manual_seed would also seed every accelerator: 85 us a
    sample, where the CPU generator's own seed takes 1.)"""
    def seed_all() -> None:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    if get_worker_info() is not None:
        seed_all()
        yield
        return
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    seed_all()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def collate_skip(batch: List[Optional[Tuple[Any, int]]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Default collate over the readable samples; also returns how many were skipped."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate(good)
    return images, targets, skipped


def open_image_folder(root: Path, what: str, *, skip_bad: bool = False, transform=None) -> SafeImageFolder:
    """One ImageFolder (``root/<class>/<image>``) or an error saying what is wrong with it."""
    root = Path(root)
    if root.is_file():
        raise NotADirectoryError(f"{what} folder {root} is a file; give a folder of class folders "
                                 f"({root.parent}/<class name>/<image file>)"
                                 + ("; sanet predict classifies single images" if what == "evaluation" else ""))
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {root} (expected ImageFolder layout "
                                f"{root}/<class name>/<image file>)")
    try:
        return SafeImageFolder(str(root), transform=transform, skip_bad=skip_bad)
    except FileNotFoundError as exc:
        # torchvision's messages: no class folders, or class folders without images
        empty = _classes_without_images(root)
        if empty and len(empty) < sum(1 for d in root.iterdir() if _is_class_folder(d)):
            raise FileNotFoundError(
                f"{what} folder {root}: class folder(s) {empty[:10]} hold no images (image files: "
                f"{', '.join(IMAGE_EXTENSIONS)}); "
                + ("every class needs images in train/ and val/ (labels are class-folder indices)"
                   if what in ("training", "validation") else "every class folder needs images")
                + ": add images or remove the folder") from None
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            raise FileNotFoundError(
                f"{what} folder {root} holds images ({loose[0].name}, ...) but no class folders: the labels are "
                f"the folder names, {root}/<class name>/<image file>"
                + ("; sanet predict classifies images without labels" if what == "evaluation" else "")) from None
        raise FileNotFoundError(f"{what} folder {root} is empty or holds no images: {exc} "
                                f"(expected {root}/<class name>/<image file>)") from None


def _is_class_folder(entry) -> bool:
    """A folder (a ``Path`` or ``os.DirEntry``) that names a class: hidden ones
    (``.ipynb_checkpoints``) are not, as hidden files are not images."""
    return entry.is_dir() and not entry.name.startswith(".")


def _classes_without_images(root: Path) -> List[str]:
    """Class folders of ``root`` (hidden ones aside) with no image file at any depth (ImageFolder's rule)."""
    def has_image(folder: Path) -> bool:
        return any(f.is_file() and is_image_file(f.name)
                   and not any(p.startswith(".") for p in f.relative_to(folder).parts[:-1])
                   for f in folder.rglob("*"))

    return [d.name for d in sorted(root.iterdir()) if _is_class_folder(d) and not has_image(d)]


def check_same_classes(train: Sequence[str], val: Sequence[str]) -> None:
    """Train and val must have the same class folders (labels are indices into them)."""
    if list(train) == list(val):
        return
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    hint = ""
    if only_train and {unicodedata.normalize("NFC", c) for c in only_train} == \
            {unicodedata.normalize("NFC", c) for c in only_val}:
        # 'café' as one character in one split and as 'e' + an accent in the other (as some
        # copies from macOS write names): the same on screen, so say what differs
        hint = (f"; they differ only in how accents are encoded (Unicode normalisation: "
                f"{', '.join(map(ascii, only_train[:3]))} vs {', '.join(map(ascii, only_val[:3]))}): rename "
                "the folders of one split")
    raise ValueError(
        "train/ and val/ have different classes (labels are class-folder indices, so they must "
        f"match): only in train: {only_train[:10] or 'none'}; only in val: {only_val[:10] or 'none'} "
        f"({len(train)} vs {len(val)} classes){hint}")


def open_train_val(data: Path, skip_bad: bool = False) -> Tuple[SafeImageFolder, SafeImageFolder]:
    """``data/train`` and ``data/val`` as ImageFolders with matching classes."""
    data = Path(data)
    if data.is_file():
        raise NotADirectoryError(f"--data {data} is a file; give the folder that holds train/ and val/ in "
                                 "ImageFolder layout (<folder>/train/<class name>/<image file>)")
    if not data.is_dir():
        raise FileNotFoundError(f"--data folder not found: {data} (expected {data}/train and "
                                f"{data}/val in ImageFolder layout)")
    if data.name in ("train", "val") and not (data / "train").exists() \
            and (data.parent / "train").is_dir() and (data.parent / "val").is_dir():
        raise FileNotFoundError(f"--data {data} is the {data.name}/ split of a dataset; give the folder "
                                f"that holds train/ and val/: --data {data.parent}")
    train = open_image_folder(data / "train", "training", skip_bad=skip_bad)
    if len(train.classes) < 2:  # the loss would be 0 and top-1 100% from the first step
        raise ValueError(f"{data / 'train'} holds one class folder ({train.classes[0]!r}): a classifier "
                         "needs at least 2 classes (one folder per class)")
    val = open_image_folder(data / "val", "validation", skip_bad=skip_bad)
    check_same_classes(train.classes, val.classes)
    return train, val


def build_transform(data_config: Dict[str, Any], *, is_training: bool,
                    aug: Optional[Dict[str, Any]] = None) -> Callable[[Any], torch.Tensor]:
    """timm's train (RandomResizedCrop + flip + ...) or eval (resize + center crop) transform."""
    from timm.data import create_transform

    if not is_training:
        check_eval_resize(data_config)
    return create_transform(**data_config, is_training=is_training, **(aug or {}))


def check_eval_resize(data_config: Dict[str, Any]) -> None:
    """timm's eval transform resizes to floor(size / crop_pct) before the center crop: refuse
    a size or crop_pct that makes that 0 pixels, or more than 4x the crop, now, not as "height
    and width must be > 0" from inside the first image's transform (which reads as if the
    image were bad) or as the memory of the machine filling up."""
    import math

    size, crop = max(data_config["input_size"][-2:]), data_config.get("crop_pct") or 0.875  # timm's default
    if size > MAX_IMG_SIZE:
        raise ValueError(f"image size {size} (--img-size, else the training run's or the model's) is above "
                         f"the {MAX_IMG_SIZE} pixels sanet reads images at")
    if crop < MIN_CROP_PCT:
        raise ValueError(f"crop_pct {crop:g} (--crop-pct, else the training run's or the model's) resizes images "
                         f"to {size / crop:.0f} pixels before the {size}-pixel center crop: use a crop_pct of at "
                         f"least {MIN_CROP_PCT} (usual values: 0.875-1.0; above 1 pads)")
    size = min(data_config["input_size"][-2:])
    if math.floor(size / crop) < 1:
        raise ValueError(f"crop_pct {crop:g} (--crop-pct, else the training run's or the model's) with image "
                         f"size {size} resizes images to "
                         f"{math.floor(size / crop)} pixels before the {size}-pixel center crop: use a "
                         f"crop_pct of at most {size} (usual values: 0.875-1.0; above 1 pads)")


def _train_sampler(dataset, ctx: DistContext, seed: int) -> DistributedSampler:
    # One replica when not distributed: same seeded, epoch-dependent permutation either way.
    # The sampler draws epoch k's order from seed + k: with the seed as given, --seed 1 took
    # the orders of --seed 0 one epoch later (runs of a seed sweep shared them).
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                              shuffle=True, seed=seed * 1_000_003, drop_last=False)


_WORKERS_NOTED = {"said": False}


def _data_loader(dataset, ctx: DistContext, *, num_workers: int, **kwargs: Any) -> DataLoader:
    """``DataLoader``, with PyTorch's warning about more workers than CPUs said once (by the
    main process, on stderr as the trainer's warnings), naming the option: PyTorch gives it
    when a loader is built and again when it is iterated, in words that don't name --workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_workers > cpus:
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        if ctx.is_main and not _WORKERS_NOTED["said"]:
            _WORKERS_NOTED["said"] = True
            print(f"warning: --workers {num_workers} is more than the {cpus} CPU(s) this process may use: "
                  f"loading images may get slower, not faster (--workers {cpus} or fewer)",
                  file=sys.stderr, flush=True)
    return DataLoader(dataset, num_workers=num_workers, **kwargs)


def build_train_loader(dataset, batch_size: int, *, workers: int, ctx: DistContext,
                       seed: int) -> DataLoader:
    """Shuffled, sharded train loader dropping the last partial batch (BatchNorm needs > 1)."""
    per_rank = -(-len(dataset) // ctx.world_size)
    if per_rank < 2:  # --batch-size is at least 2 (BatchNorm): no batch size fits
        raise ValueError(
            f"{len(dataset)} training image(s) for {ctx.world_size} process(es): every process needs at "
            "least 2 images for a batch. Add images or run fewer processes")
    if per_rank < batch_size:
        total = batch_size * ctx.world_size
        raise ValueError(
            f"batch size {batch_size} per process x {ctx.world_size} process(es) = {total} "
            f"exceeds the {len(dataset)} training images ({per_rank} per process): no full "
            f"batch. Use --batch-size {max(1, per_rank)} or less, or add images")
    return _data_loader(
        dataset, ctx, batch_size=batch_size, sampler=_train_sampler(dataset, ctx, seed),
        num_workers=workers, drop_last=True, collate_fn=collate_skip,
        pin_memory=ctx.device.type == "cuda", generator=torch.Generator(),
        persistent_workers=False)


def reseed_loader(loader: DataLoader, epoch: int, seed: int) -> None:
    """Make this epoch's order and augmentation a function of (seed, epoch) only: not of the
    number of workers, nor of the run being fresh or resumed."""
    loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 1_000_003 + epoch)
    if isinstance(loader.dataset, SafeImageFolder):
        loader.dataset.aug_seed = (seed, epoch)


def build_eval_loader(dataset, batch_size: int, *, workers: int, ctx: DistContext) -> DataLoader:
    """In-order loader; under DDP each rank takes every world_size-th image.

    Not DistributedSampler: it pads the dataset with repeated images so every rank gets the
    same count, which would count those images twice in the metrics.
    """
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    return _data_loader(dataset, ctx, batch_size=batch_size, sampler=indices, num_workers=workers,
                      collate_fn=collate_skip, pin_memory=ctx.device.type == "cuda")
