"""Image files as 8-bit RGB, for training, ``sanet eval`` and ``sanet predict`` alike."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "load_rgb"]

#: The files an ImageFolder class folder is read from: torchvision's extensions and GIF (its
#: first frame). Pillow reads GIFs, and ``sanet predict`` took them, but ImageFolder skipped
#: them without a word.
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + (".gif",)


def _is_16_bit(img: Image.Image) -> bool:
    """16-bit greyscale: Pillow's "I;16*" modes, or mode "I" (32-bit) decoded from 16-bit data
    (the decoder's raw mode, known before ``load()``), as some Pillow versions open 16-bit PNGs.
    A true 32-bit integer image keeps Pillow's own conversion."""
    if img.mode.startswith("I;16"):
        return True
    if img.mode != "I" or not img.tile:
        return False
    raw = img.tile[0][3]
    raw = raw[0] if isinstance(raw, tuple) else raw
    return isinstance(raw, str) and raw.startswith("I;16")


def is_image_file(path: str) -> bool:
    """An image extension, and not a hidden file: macOS leaves ``._name.png`` metadata files
    (AppleDouble) beside copied images, which no image reader can decode."""
    return has_file_allowed_extension(path, IMAGE_EXTENSIONS) and not os.path.basename(path).startswith(".")


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """The image at ``path`` as 8-bit RGB. 16-bit greyscale is scaled to 8 bits (x / 257):
    Pillow's ``convert("RGB")`` clips it instead, which made every value above 255 white."""
    with open(path, "rb") as f, warnings.catch_warnings():
        # Pillow warns from 89M pixels (per image, with its source line) and refuses 179M
        # (DecompressionBombError: an unreadable image, named); between them it is an image.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(f)
        except UnidentifiedImageError:  # its message names the file object, not the path
            raise UnidentifiedImageError("not in an image format Pillow can read") from None
        if img.mode == "F":  # convert("RGB") would clip every value to [0, 255], silently
            raise ValueError("a 32-bit floating-point image (Pillow mode F) has no defined value range; "
                             "save it as 8- or 16-bit")
        sixteen = _is_16_bit(img)
        img.load()
    if sixteen:
        values = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")
