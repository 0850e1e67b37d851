"""Inference helpers for ``sanet eval`` and ``sanet predict``: transforms, class mapping, top-k."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .data import UnreadableImageError, check_eval_resize
from .images import load_rgb

__all__ = ["eval_transform", "target_map_for", "check_image_paths", "read_images",
           "read_readable_images", "topk_predictions"]


def eval_transform(model: nn.Module, data_args: Dict[str, Any], img_size: Optional[int] = None,
                   crop_pct: Optional[float] = None):
    """timm's eval transform (resize + center crop); flags override the training settings,
    which override the model's pretrained_cfg."""
    from timm.data import create_transform, resolve_data_config

    if img_size is not None and img_size < 8:
        raise ValueError(f"--img-size must be at least 8 pixels, got {img_size}")
    if crop_pct is not None and not crop_pct > 0:
        raise ValueError(f"--crop-pct must be positive (above 1 pads), got {crop_pct}")
    size = img_size or data_args.get("img_size")
    overrides = {"crop_pct": crop_pct if crop_pct is not None else data_args.get("crop_pct"),
                 "interpolation": data_args.get("interpolation")}
    if size:
        overrides["input_size"] = (3, int(size), int(size))
    cfg = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    check_eval_resize(cfg)
    return create_transform(**cfg, is_training=False)


def target_map_for(folder_classes: Sequence[str], class_names: Optional[Sequence[str]],
                   num_classes: int) -> Optional[torch.Tensor]:
    """Dataset class index -> model output index, or None when they are the same.

    Folder names are matched to the model's class names (a training checkpoint's folders, or
    ImageNet's WordNet ids for 1000-class weights). Unnamed classes must match in number.
    """
    folder_classes = list(folder_classes)
    candidates: List[List[str]] = [list(class_names)] if class_names else []
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        candidates.append(list(ImageNetInfo().label_names()))  # n01440764, ...
    for names in candidates:
        if folder_classes == names:
            return None
        if set(folder_classes) <= set(names):
            index = {name: i for i, name in enumerate(names)}
            return torch.tensor([index[c] for c in folder_classes], dtype=torch.long)
    if len(folder_classes) == num_classes and not class_names:
        return None  # same count, no names to check: sorted folder order = output order
    if not candidates:
        raise ValueError(f"the data has {len(folder_classes)} class folders but the model has "
                         f"{num_classes} outputs and no class names to match them by")
    known = set().union(*map(set, candidates))
    unknown = [c for c in folder_classes if c not in known]
    raise ValueError(
        f"{len(unknown)} of the data's {len(folder_classes)} class folders are not classes of this "
        f"model (e.g. {unknown[:5]}; folders are matched by name to the model's classes, e.g. "
        f"{candidates[-1][:5]}); evaluate on a folder holding the training classes or a subset of them")


def check_image_paths(paths: Sequence[Path]) -> None:
    """Every path is a file (a folder or a missing file named before any work)."""
    for path in map(Path, paths):
        if path.is_dir():
            raise ValueError(f"{path} is a folder; pass image files (e.g. {path}/*.jpg), or evaluate a "
                             "folder of class folders with sanet eval")
        if not path.is_file():
            hint = ""
            if path.is_symlink():
                hint = " (a symbolic link to a missing file, or a loop of links)"
            elif any(ch in str(path) for ch in "*?["):
                hint = " (a shell pattern that matched no file is passed on as it is)"
            raise FileNotFoundError(f"image not found: {path}{hint}")


def read_images(paths: Sequence[Path], transform) -> torch.Tensor:
    """Load and transform images; an unreadable file is an error naming it."""
    batch, errors = read_readable_images(paths, transform)
    for error in errors:
        if error is not None:
            raise UnreadableImageError(f"{error} (pass --skip-bad-images to skip unreadable files)")
    return batch


def read_readable_images(paths: Sequence[Path], transform) -> Tuple[Optional[torch.Tensor], List[Optional[str]]]:
    """Load and transform the images that can be read: the batch of those (None if none
    could be), and per path ``None`` or the reason it could not be read."""
    check_image_paths(paths)
    tensors, errors = [], []
    for path in map(Path, paths):
        try:
            image = load_rgb(path)
        except MemoryError:  # the machine's limit, not the file's fault: reported as out of memory
            raise
        except Exception as exc:  # PIL raises several types for bad files
            errors.append(f"cannot read image {path}: {type(exc).__name__}: {exc}")
            continue
        # Outside the try: the transform follows the options (--img-size, --crop-pct, checked
        # when it was built), and its failure is not the file's.
        tensors.append(transform(image))
        errors.append(None)
    return (torch.stack(tensors) if tensors else None), errors


@torch.no_grad()
def topk_predictions(model: nn.Module, images: torch.Tensor, k: int,
                     class_names: Optional[Sequence[str]]) -> List[List[Dict[str, Any]]]:
    """Per image, the k most probable classes: ``index``, ``label``, ``prob`` (softmax)."""
    logits = model(images).float()
    if not logits.isfinite().all():  # softmax of NaN is NaN: a "nan%" ranking is no prediction
        raise ValueError("the model's outputs hold NaN or inf: its weights hold NaN/inf or overflow; no "
                         "prediction is made")
    probs = logits.softmax(dim=-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [{"index": int(i), "label": class_names[int(i)] if class_names else f"class {int(i)}",
          "prob": float(p)} for p, i in zip(values.tolist(), indices.tolist())]
        for values, indices in zip(top.values, top.indices)
    ]
