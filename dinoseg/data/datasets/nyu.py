"""NYU Depth v2 in the official DINOv3 / BTS layout.

    root/nyu_train.txt, root/nyu_test.txt      lines "<rgb> <depth> <focal>", paths relative to root, e.g.
                                               "/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579"
    root/<scene>/rgb_XXXXX.jpg                 RGB images
    root/<scene>/sync_depth_XXXXX.png          16-bit PNG depth in millimetres, 0 = no measurement

Splits: train (nyu_train.txt), val and test (both nyu_test.txt, as the official code). Samples are in the
sorted order of the split file's lines, as the official dataset.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..io import DatasetError
from .base import normalize_split
from .depth_base import DepthDataset, DepthSample, read_depth_split_file

SPLIT_FILES = {"train": "nyu_train.txt", "val": "nyu_test.txt", "test": "nyu_test.txt"}
_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}


class NYU(DepthDataset):
    depth_scale = 1000.0
    max_depth = 10.0
    eval_mask = "NYU_EIGEN"

    def __init__(self, *, split: str, root: str | None = None, transforms: Callable | None = None, strict: bool = True):
        if root is None or not os.path.isdir(os.path.expanduser(str(root))):
            raise DatasetError(f"NYU: root folder not found: {root}")
        root = os.path.expanduser(str(root))
        split = normalize_split(split, _ALIASES, "NYU")
        super().__init__(root, split, transforms, strict)
        list_file = os.path.join(root, SPLIT_FILES[split])
        entries = read_depth_split_file(list_file, "NYU", self.problems)
        for number, image, depth, focal in sorted(entries, key=lambda e: (e[1], str(e[2]), e[3] or 0.0)):
            if depth is None:
                self.problems.append((f"{list_file}:{number}", "no depth map given ('None')"))
                continue
            image_path = os.path.join(root, image.strip("/"))
            depth_path = os.path.join(root, depth.strip("/"))
            if not os.path.isfile(image_path):
                self.problems.append((image_path, f"missing image (listed in {list_file}:{number})"))
                continue
            if not os.path.isfile(depth_path):
                self.problems.append((depth_path, f"missing depth map (listed in {list_file}:{number})"))
                depth_path = None
            self.samples.append(DepthSample(image_path, depth_path, os.path.splitext(image.strip("/"))[0], focal))
        self._finish_indexing(list_file)
