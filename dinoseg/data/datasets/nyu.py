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

from .base import normalize_split
from .depth_base import SPLIT_FILE_ALIASES, DepthDataset, read_depth_split_file, split_file_root

SPLIT_FILES = {"train": "nyu_train.txt", "val": "nyu_test.txt", "test": "nyu_test.txt"}


class NYU(DepthDataset):
    depth_scale = 1000.0
    max_depth = 10.0
    eval_mask = "NYU_EIGEN"

    def __init__(self, *, split: str, root: str | None = None, transforms: Callable | None = None, strict: bool = True):
        root = split_file_root(root, "NYU")
        split = normalize_split(split, SPLIT_FILE_ALIASES, "NYU")
        super().__init__(root, split, transforms, strict)
        list_file = os.path.join(root, SPLIT_FILES[split])
        entries = read_depth_split_file(list_file, "NYU", self.problems)
        for number, image, depth, focal in sorted(entries, key=lambda e: (e[1], str(e[2]), e[3] or 0.0)):
            if depth is None:
                self.problems.append((f"{list_file}:{number}", "no depth map given ('None')"))
                continue
            self._add_listed_sample(list_file, number, image, depth, focal, root, root)
        self._finish_indexing(list_file)
