"""Reading images and label maps from disk, exactly and with errors that name the file at fault.

Images always come back as RGB ``uint8`` tensors ``[3, H, W]`` whatever their mode (grayscale, palette, RGBA,
16-bit, CMYK). Label maps are decoded without any resampling or colour conversion: single-channel and palette
PNGs give their stored indices; colour (RGB) masks are only accepted with a palette to map colours to indices.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")  # lossless formats only: JPEG would corrupt label values
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")


class DatasetError(ValueError):
    """A problem with a dataset on disk or its description; the message names the file, key or value.
    ``path`` and ``reason`` (when set) hold the file and the fault separately, for ``check_dataset``."""

    def __init__(self, message: str, path: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.reason = path, reason


def _open(path: str, what: str) -> Image.Image:
    if not os.path.isfile(path):
        raise DatasetError(f"{what} not found: {path}", path, f"{what} not found")
    try:
        img = Image.open(path)
        # Decode now: PIL is lazy and a truncated file would otherwise fail later, far from its name.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:
        reason = f"unreadable or corrupt {what}: {type(e).__name__}: {e}"
        raise DatasetError(f"{path}: {reason}", path, reason) from None
    return img


def load_image(path: str) -> torch.Tensor:
    """Read an image file as an RGB ``uint8`` tensor ``[3, H, W]`` (pixels as stored: EXIF rotation is ignored,
    so that images stay aligned with their label maps)."""
    img = _open(path, "image")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth grayscale: PIL's convert("RGB") would clip, so rescale to the 8-bit range first.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    else:
        arr = np.array(img.convert("RGB"))  # L, LA, P (with or without transparency), RGBA, CMYK, YCbCr...
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def load_mask(path: str, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Read a label map as an ``int64`` array ``[H, W]`` of the values stored in the file.

    ``L``/``I``/``I;16`` images give their values, ``P`` (palette) images their palette indices (the VOC
    encoding). ``RGB``/``RGBA`` masks are mapped colour -> index through ``palette`` (an unknown colour is an
    error); without a palette they are accepted only when gray (R == G == B).
    """
    img = _open(path, "mask")
    if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        return np.asarray(img).astype(np.int64)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[:, :, :3]
        if palette is not None:
            return _colors_to_index(rgb, palette, path)
        if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
            return rgb[:, :, 0].astype(np.int64)
        reason = (
            f"mask is a colour ({img.mode}) image but no palette was given to decode it: save masks as "
            "single-channel or palette PNGs of class indices, or give the class colours (palette)"
        )
        raise DatasetError(f"{path}: {reason}", path, reason)
    if img.mode == "LA":
        return np.asarray(img)[:, :, 0].astype(np.int64)
    reason = f"mask has unsupported image mode {img.mode!r}"
    raise DatasetError(f"{path}: {reason}", path, reason)


def _colors_to_index(rgb: np.ndarray, palette: Sequence[Sequence[int]], path: str) -> np.ndarray:
    codes = (rgb[:, :, 0].astype(np.int64) << 16) | (rgb[:, :, 1].astype(np.int64) << 8) | rgb[:, :, 2]
    pal = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    uniq, inverse = np.unique(codes, return_inverse=True)
    lookup = {int(c): i for i, c in enumerate(pal_codes)}
    unknown = [u for u in uniq.tolist() if u not in lookup]
    if unknown:
        u = unknown[0]
        reason = (
            f"mask has colour {(u >> 16, (u >> 8) & 255, u & 255)} which is not in the palette "
            f"({len(unknown)} unknown colour(s))"
        )
        raise DatasetError(f"{path}: {reason}", path, reason)
    return np.asarray([lookup[u] for u in uniq.tolist()], dtype=np.int64)[inverse.reshape(codes.shape)]


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as e:
        raise DatasetError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    return h, w


def exif_orientation(path: str) -> int:
    """EXIF orientation tag (1 = as stored) of an image file; 1 when absent or unreadable."""
    try:
        with Image.open(path) as img:
            return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def read_list_file(path: str) -> list[str]:
    """Non-empty, stripped lines of a split list file (first whitespace-separated token of each line)."""
    if not os.path.isfile(path):
        raise DatasetError(f"split file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip() and not line.lstrip().startswith("#")]
