"""Synthetic boxes: a deterministic detection dataset generated on the fly (no files, no download), for the demo
and the tests.

Each image is a dull, blotchy background with 1-4 objects that do not overlap. A class is told apart by colour
AND outline together (a red disk, a green square, a blue triangle, ...), objects are 25-50 % of the image side,
so that a small frozen network with random weights and a detection head learn them in minutes. An object's box
is the exact extent of its drawn pixels. Category ids are 1, 3, 5, ... -- deliberately not contiguous, like
COCO's -- so that the demo goes through the category id <-> label mapping as a real dataset does.

Sample ``i`` of a split depends only on ``(seed, split, i)``, so workers and ranks agree on the data;
`write_coco` writes the split out as a COCO folder (PNG images + JSON) for `CocoJson`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .coco import DetectionDataset, DetectionSample, make_sample
from .common import GeneratedSamples

# name, colour, outline
_CLASSES = [
    ("red disk", (225, 35, 35), "disk"),
    ("green square", (35, 190, 55), "square"),
    ("blue triangle", (40, 70, 230), "triangle"),
    ("yellow ring", (235, 215, 30), "ring"),
    ("magenta cross", (215, 45, 205), "cross"),
    ("cyan diamond", (35, 205, 215), "diamond"),
]
SYNTHETIC_BOXES_MAX_CLASSES = len(_CLASSES)


def category_id(k: int) -> int:
    """The category id of synthetic class k (0-based): 1, 3, 5, ..."""
    return 2 * k + 1


def _outline(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of an outline on coordinates u, v in [-1, 1] across its box."""
    if kind == "disk":
        return u**2 + v**2 <= 1.0
    if kind == "square":
        return np.ones(u.shape, dtype=bool)
    if kind == "triangle":  # apex at the top, base at the bottom
        return np.abs(u) <= (v + 1.0) / 2.0
    if kind == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1.0) & (r2 >= 0.3)
    if kind == "cross":
        return (np.abs(u) <= 0.35) | (np.abs(v) <= 0.35)
    return np.abs(u) + np.abs(v) <= 1.0  # diamond


class SyntheticBoxes(GeneratedSamples, DetectionDataset):
    """Deterministic synthetic detection data (see the module docstring).

    Args:
        split: "train", "val", "test" (or any name: it only changes the random stream).
        num_samples: number of images in the split.
        image_size: side (int) or (height, width), at least 32.
        seed: global seed; sample i of a split is a function of (seed, split, i) only.
        num_classes: 1..6 classes (category ids 1, 3, ..., 2 * num_classes - 1).
        min_objects / max_objects: objects drawn per image (fewer when no free place is found).
        category_ids_as_labels: labels are the category ids (see `CocoJson`).
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 64,
        image_size: int | tuple[int, int] = 96,
        seed: int = 0,
        transforms: Callable | None = None,
        *,
        num_classes: int = 4,
        min_objects: int = 1,
        max_objects: int = 4,
        category_ids_as_labels: bool = False,
        strict: bool = True,  # accepted for a uniform API: generated data has no files to miss
    ):
        super().__init__(None, str(split).lower(), transforms, strict=strict)
        if not 1 <= num_classes <= SYNTHETIC_BOXES_MAX_CLASSES:
            raise ValueError(f"SyntheticBoxes: num_classes={num_classes} must be in 1..{SYNTHETIC_BOXES_MAX_CLASSES}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"SyntheticBoxes: need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        self._set_samples(num_samples, image_size, seed, min_side=32)
        self._set_categories({category_id(k): _CLASSES[k][0] for k in range(num_classes)}, category_ids_as_labels)
        self.palette = [_CLASSES[k][1] for k in range(num_classes)]
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self._cache: tuple[int, torch.Tensor, DetectionSample] | None = None

    def generate(self, index: int) -> tuple[torch.Tensor, DetectionSample]:
        """(RGB uint8 [3, H, W], its annotations) of sample ``index``."""
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1], self._cache[2]
        rng = self._rng(index)
        h, w = self.image_size
        side = min(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)

        gray = rng.uniform(80, 170)
        base = gray + rng.uniform(-10, 10, size=3)
        coarse = rng.uniform(-1, 1, size=(h // 16 + 2, w // 16 + 2))
        blotch = np.kron(coarse, np.ones((16, 16)))[:h, :w]
        image = base[None, None, :] + 20.0 * blotch[:, :, None]

        taken: list[tuple[int, int, int, int]] = []  # x0, y0, x1, y1 (exclusive) of the drawn objects
        annotations = []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            cls = int(rng.integers(0, len(self.category_ids)))
            name, color, outline = _CLASSES[cls]
            bw, bh = (int(v) for v in rng.uniform(0.25, 0.5, size=2) * side)
            if outline in ("disk", "ring", "square", "cross", "diamond") and rng.uniform() < 0.7:
                bh = bw  # mostly regular shapes, some stretched
            for _try in range(20):  # a free place, 2 px away from the other objects
                x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
                if all(x0 >= b[2] + 2 or b[0] >= x0 + bw + 2 or y0 >= b[3] + 2 or b[1] >= y0 + bh + 2 for b in taken):
                    break
            else:
                break
            u = (xx - x0 - (bw - 1) / 2) / max((bw - 1) / 2, 0.5)
            v = (yy - y0 - (bh - 1) / 2) / max((bh - 1) / 2, 0.5)
            inside = _outline(outline, u, v) & (np.abs(u) <= 1) & (np.abs(v) <= 1)
            rows, cols = np.nonzero(inside)
            if rows.size == 0:
                continue
            shade = np.asarray(color, dtype=np.float64) + rng.uniform(-15, 15, size=3)
            image[inside] = shade * (1.0 + 0.12 * rng.uniform(-1, 1, size=(rows.size, 1)))
            x1, y1 = int(cols.max()) + 1, int(rows.max()) + 1
            box = [float(cols.min()), float(rows.min()), float(x1 - cols.min()), float(y1 - rows.min())]
            taken.append((int(cols.min()), int(rows.min()), x1, y1))
            aid = index * self.max_objects + len(annotations) + 1
            annotations.append((aid, box, category_id(cls), False, float(rows.size)))

        image += rng.normal(0.0, 5.0, size=image.shape)
        image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        sample = make_sample(None, self.sample_name(index), index + 1, h, w, annotations)
        out = (torch.from_numpy(image).permute(2, 0, 1).contiguous(), sample)
        self._cache = (index, *out)
        return out

    def annotations(self, index: int) -> DetectionSample:
        return self.generate(index)[1]

    def load_image(self, index: int) -> torch.Tensor:
        return self.generate(index)[0].clone()

    def __repr__(self) -> str:
        return (f"SyntheticBoxes(split={self.split!r}, num_samples={self.num_samples}, image_size={self.image_size}, "
                f"seed={self.seed}, num_classes={len(self.category_ids)})")
