"""Image files as 8-bit RGB, for training, ``sanet eval`` and ``sanet predict`` alike."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "load_rgb"]

#: The files an ImageFolder class folder is read from: torchvision's extensions and GIF (its
#: first frame). Pillow reads GIFs, and ``sanet predict`` took them, but ImageFolder skipped
#: them without a word.
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + (".gif",)

# Pillow's modes for 16-bit greyscale (16-bit PNG and TIFF open as one of these).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """The image at ``path`` as 8-bit RGB. 16-bit greyscale is scaled to 8 bits (x / 257):
    Pillow's ``convert("RGB")`` clips it instead, which made every value above 255 white."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")
