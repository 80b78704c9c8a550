"""KITTI depth on the Eigen split, in the layout of the BTS / AdaBins / Monocular-Depth-Estimation-Toolbox
(which the DINOv2 depth evaluation uses).

    root/kitti_eigen_train.txt, root/kitti_eigen_test.txt
        lines "<image> <depth | None> [<focal>]", e.g.
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png
         2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png 721.5377"
    root/input/<image>          raw KITTI images (image_dir)
    root/gt_depth/<depth>       annotated depth (data_depth_annotated), 16-bit PNG, metres x 256, 0 = none (depth_dir)

Lines whose depth is "None" (Eigen test frames without annotated depth: 45 of 697) are skipped and counted in
``num_without_depth``. Evaluate with the Garg crop (``eval_mask = "KITTI_GARG"``) over 0.001-80 m, the images at
their full size; `FixedCrop("KITTI_KB")` gives the 352 x 1216 benchmark crop for training.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .base import normalize_split
from .depth_base import SPLIT_FILE_ALIASES, DepthDataset, read_depth_split_file, split_file_root

SPLIT_FILES = {"train": "kitti_eigen_train.txt", "val": "kitti_eigen_test.txt", "test": "kitti_eigen_test.txt"}


class KITTI(DepthDataset):
    depth_scale = 256.0
    max_depth = 80.0
    eval_mask = "KITTI_GARG"

    def __init__(
        self,
        *,
        split: str,
        root: str | None = None,
        transforms: Callable | None = None,
        image_dir: str = "input",
        depth_dir: str = "gt_depth",
        split_file: str | None = None,
        strict: bool = True,
    ):
        root = split_file_root(root, "KITTI")
        split = normalize_split(split, SPLIT_FILE_ALIASES, "KITTI")
        super().__init__(root, split, transforms, strict)
        list_file = os.path.join(root, split_file or SPLIT_FILES[split])
        self.num_without_depth = 0
        for number, image, depth, focal in read_depth_split_file(list_file, "KITTI", self.problems):
            if depth is None:
                self.num_without_depth += 1
                continue
            self._add_listed_sample(list_file, number, image, depth, focal, os.path.join(root, image_dir),
                                    os.path.join(root, depth_dir))
        self._finish_indexing(list_file)
