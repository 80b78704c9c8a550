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

from ..io import DatasetError
from .base import normalize_split
from .depth_base import DepthDataset, DepthSample, read_depth_split_file

SPLIT_FILES = {"train": "kitti_eigen_train.txt", "val": "kitti_eigen_test.txt", "test": "kitti_eigen_test.txt"}
_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}


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
        if root is None or not os.path.isdir(os.path.expanduser(str(root))):
            raise DatasetError(f"KITTI: root folder not found: {root}")
        root = os.path.expanduser(str(root))
        split = normalize_split(split, _ALIASES, "KITTI")
        super().__init__(root, split, transforms, strict)
        list_file = os.path.join(root, split_file or SPLIT_FILES[split])
        self.num_without_depth = 0
        for number, image, depth, focal in read_depth_split_file(list_file, "KITTI", self.problems):
            if depth is None:
                self.num_without_depth += 1
                continue
            image_path = os.path.join(root, image_dir, image.strip("/"))
            depth_path = os.path.join(root, depth_dir, depth.strip("/"))
            if not os.path.isfile(image_path):
                self.problems.append((image_path, f"missing image (listed in {list_file}:{number})"))
                continue
            if not os.path.isfile(depth_path):
                self.problems.append((depth_path, f"missing depth map (listed in {list_file}:{number})"))
                depth_path = None
            self.samples.append(DepthSample(image_path, depth_path, os.path.splitext(image.strip("/"))[0], focal))
        self._finish_indexing(list_file)
