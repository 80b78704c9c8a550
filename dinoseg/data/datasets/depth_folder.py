"""A depth dataset of your own: an image folder and a depth folder matched by file stem.

    root/images/<name>.{jpg,png,...}     root/depths/<name>.{png,tif,tiff,npy}   (16-bit PNG, float TIFF, .npy)
    root/images/<split>/...              root/depths/<split>/...                  (optional per-split folders)
    root/splits/<split>.txt or root/<split>.txt                                   (optional lists of names)

`depth_scale`: stored units per metre (1000 for millimetre PNGs, 256 for KITTI-style PNGs, 1 for metres);
`invalid_value`: the stored value of pixels without a measurement (0, 65535, nan...). Non-finite and negative
values are missing too. Missing depth becomes 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from ..io import DatasetError
from .base import check_root
from .common import folder_split_images
from .depth_base import DEPTH_EXTENSIONS, DepthDataset, DepthSample


class DepthFolder(DepthDataset):
    def __init__(
        self,
        root: str,
        split: str | None = None,
        transforms: Callable | None = None,
        *,
        depth_scale: float = 1000.0,
        invalid_value: float = 0.0,
        max_depth: float | None = None,
        image_dir: str = "images",
        depth_dir: str = "depths",
        depth_suffix: str = "",
        strict: bool = True,
    ):
        root = check_root(root, "DepthFolder")
        split = None if split is None or str(split).lower() in ("", "all", "none") else str(split)
        super().__init__(root, split, transforms, strict)
        if not (math.isfinite(depth_scale) and depth_scale > 0):
            raise DatasetError(f"DepthFolder: depth_scale must be a positive number (stored units per metre), got {depth_scale}")
        if max_depth is not None and not max_depth > 0:
            raise DatasetError(f"DepthFolder: max_depth must be a positive number of metres (or None), got {max_depth}")
        self.depth_scale = float(depth_scale)
        self.invalid_value = float(invalid_value)
        self.max_depth = None if max_depth is None else float(max_depth)
        self.depth_suffix = depth_suffix
        self._index(os.path.join(root, image_dir), os.path.join(root, depth_dir))

    def _index(self, image_root: str, depth_root: str) -> None:
        names, where = folder_split_images(self.root, image_root, self.split, self.problems)
        for rel in names:
            stem = os.path.splitext(rel)[0]
            candidates = [os.path.join(depth_root, stem + self.depth_suffix + ext) for ext in DEPTH_EXTENSIONS]
            depth = next((p for p in candidates if os.path.isfile(p)), None)
            if depth is None:
                self.problems.append(
                    (os.path.join(image_root, rel), f"missing depth map: expected {candidates[0]} (or .tif/.tiff/.npy)")
                )
            self.samples.append(DepthSample(os.path.join(image_root, rel), depth, stem.replace(os.sep, "/")))
        self._finish_indexing(where)
