"""Synthetic shapes: a deterministic segmentation dataset generated on the fly (no files, no download).

Each image is a textured, low-saturation background with a few large shapes drawn on top. A shape's class
is given by its colour and texture only (its outline -- disk, box, triangle -- is random), so the label of
every pixel is predictable from local appearance: a linear probe on patch features of a frozen network,
even one with random weights, learns it (see tests/test_datasets.py for the measured accuracy). A band of
``ignore_border`` pixels along every shape outline is labelled 255 (ignored), like the VOC object borders.

Sample ``i`` of a split depends only on ``(seed, split, i)``, so workers and ranks agree on the data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..io import DatasetError
from .base import IGNORE_INDEX, SegmentationDataset
from .common import GeneratedSamples

# name, base colour, texture. Colours are saturated so they never look like the background.
_CLASSES = [
    ("background", (128, 128, 128), "background"),
    ("red stripes", (220, 40, 40), "stripes"),
    ("green checks", (40, 190, 60), "checks"),
    ("blue dots", (40, 70, 220), "dots"),
    ("yellow plain", (230, 210, 40), "plain"),
    ("magenta waves", (210, 50, 200), "waves"),
    ("cyan grain", (40, 200, 210), "grain"),
    ("orange bars", (240, 130, 20), "bars"),
]
SYNTHETIC_MAX_CLASSES = len(_CLASSES)


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness modulation in about [-1, 1] for one texture, with a random phase / orientation."""
    if kind == "stripes":  # oblique stripes, period 6 px
        theta = rng.uniform(0, np.pi)
        t = (xx * np.cos(theta) + yy * np.sin(theta)) / 6.0 + rng.uniform()
        return np.where((t % 1.0) < 0.5, 1.0, -1.0)
    if kind == "checks":  # 4 px checkerboard
        ox, oy = rng.integers(0, 8, size=2)
        return np.where(((xx + ox) // 4 + (yy + oy) // 4) % 2 == 0, 1.0, -1.0)
    if kind == "dots":  # dark dots on a 6 px grid
        ox, oy = rng.integers(0, 6, size=2)
        d2 = ((xx + ox) % 6 - 2.5) ** 2 + ((yy + oy) % 6 - 2.5) ** 2
        return np.where(d2 < 3.0, -1.0, 0.4)
    if kind == "waves":
        return np.sin(xx / 2.0 + 2.0 * np.sin(yy / 4.0 + rng.uniform(0, 6.3)))
    if kind == "grain":
        return rng.uniform(-1.0, 1.0, size=yy.shape)
    if kind == "bars":  # horizontal or vertical bars, period 8 px
        t = (yy if rng.integers(2) else xx) / 8.0 + rng.uniform()
        return np.where((t % 1.0) < 0.35, 1.0, -0.5)
    return np.zeros(yy.shape)  # plain


def _shape_mask(yy: np.ndarray, xx: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A large random disk / ellipse, rotated box or triangle (sizes ~ 0.2-0.4 of the image side)."""
    s = min(h, w)
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    a, b = rng.uniform(0.18, 0.38, size=2) * s
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    kind = rng.integers(3)
    if kind == 0:
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == 1:
        return (np.abs(u) <= a) & (np.abs(v) <= b * 0.8)
    # triangle: inside three half-planes around the centre
    angles = theta + np.array([0.0, 2.0944, 4.1888])
    inside = np.ones(yy.shape, dtype=bool)
    for ang in angles:
        inside &= (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang) <= 0.55 * a
    return inside


class SyntheticShapes(GeneratedSamples, SegmentationDataset):
    """Deterministic synthetic segmentation data (see the module docstring).

    Args:
        split: "train", "val", "test" (or any name: it only changes the random stream).
        num_samples: number of images in the split.
        image_size: side (int) or (height, width).
        seed: global seed; sample i of a split is a function of (seed, split, i) only.
        num_classes: 2..8 classes including the background (class 0).
        min_shapes / max_shapes: shapes drawn per image.
        ignore_border: width in pixels of the ignored band along shape outlines (0 = none).
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 64,
        image_size: int | tuple[int, int] = 64,
        seed: int = 0,
        transforms: Callable | None = None,
        *,
        num_classes: int = 6,
        min_shapes: int = 2,
        max_shapes: int = 4,
        ignore_border: int = 1,
        strict: bool = True,  # accepted for a uniform API: generated data has no files to miss
    ):
        super().__init__(None, str(split).lower(), transforms, strict=strict)
        if not 2 <= num_classes <= SYNTHETIC_MAX_CLASSES:
            raise DatasetError(f"SyntheticShapes: num_classes={num_classes} must be in 2..{SYNTHETIC_MAX_CLASSES}")
        if not 1 <= min_shapes <= max_shapes:
            raise DatasetError(f"SyntheticShapes: need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        self._set_samples(num_samples, image_size, seed, min_side=8)
        self.num_classes = int(num_classes)
        self.class_names = [c[0] for c in _CLASSES[:num_classes]]
        self.palette = [c[1] for c in _CLASSES[:num_classes]]
        self.min_shapes, self.max_shapes = int(min_shapes), int(max_shapes)
        self.ignore_border = int(ignore_border)
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def mask_path(self, index: int) -> None:
        return None

    def generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(RGB uint8 [3, H, W], int64 label [H, W]) of sample ``index``."""
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1], self._cache[2]
        rng = self._rng(index)
        h, w = self.image_size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)

        # Background: a random dull colour, smooth blotches and fine noise.
        gray = rng.uniform(70, 180)
        base = gray + rng.uniform(-12, 12, size=3)
        coarse = rng.uniform(-1, 1, size=(h // 16 + 2, w // 16 + 2))
        blotch = np.kron(coarse, np.ones((16, 16)))[:h, :w]
        image = base[None, None, :] + 25.0 * blotch[:, :, None]
        label = np.zeros((h, w), dtype=np.int64)

        for _ in range(int(rng.integers(self.min_shapes, self.max_shapes + 1))):
            cls = int(rng.integers(1, self.num_classes))
            _, color, texture = _CLASSES[cls]
            inside = _shape_mask(yy, xx, h, w, rng)
            color = np.asarray(color, dtype=np.float64) + rng.uniform(-20, 20, size=3)
            shade = color[None, None, :] * (1.0 + 0.3 * _texture(texture, yy, xx, rng))[:, :, None]
            image[inside] = shade[inside]
            label[inside] = cls

        image += rng.normal(0.0, 6.0, size=image.shape)
        image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        if self.ignore_border > 0:
            label = self._ignore_outlines(label)
        out = (torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label))
        self._cache = (index, *out)
        return out

    def _ignore_outlines(self, label: np.ndarray) -> np.ndarray:
        edge = np.zeros(label.shape, dtype=bool)
        edge[1:, :] |= label[1:, :] != label[:-1, :]
        edge[:-1, :] |= label[1:, :] != label[:-1, :]
        edge[:, 1:] |= label[:, 1:] != label[:, :-1]
        edge[:, :-1] |= label[:, 1:] != label[:, :-1]
        band = edge.copy()
        for _ in range(self.ignore_border - 1):  # widen the 2-pixel outline by one pixel per step
            grown = band.copy()
            grown[1:, :] |= band[:-1, :]
            grown[:-1, :] |= band[1:, :]
            grown[:, 1:] |= band[:, :-1]
            grown[:, :-1] |= band[:, 1:]
            band = grown
        out = label.copy()
        out[band] = IGNORE_INDEX
        return out

    def load_image(self, index: int) -> torch.Tensor:
        return self.generate(index)[0].clone()

    def load_label(self, index: int) -> torch.Tensor:
        return self.generate(index)[1].clone()

    def load_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.generate(index)
        return image.clone(), label.clone()

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(split={self.split!r}, num_samples={self.num_samples}, image_size={self.image_size}, "
            f"seed={self.seed}, num_classes={self.num_classes})"
        )
