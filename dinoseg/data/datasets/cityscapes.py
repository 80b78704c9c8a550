"""Cityscapes (fine annotations, 19 evaluation classes).

    root/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       # 34 label ids
    root/gtFine/.../<...>_gtFine_labelTrainIds.png   # optional, from cityscapesscripts' createTrainIdLabelImgs

``labelIds`` are mapped to the 19 train ids, every other id (void, license plate, rail track...) -> 255.
A ``labelTrainIds`` file, when present, is read as is (``use_train_ids="auto"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ..io import DatasetError
from .base import Sample, SegmentationDataset, check_root, map_values, normalize_split

CITYSCAPES_CLASS_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip
# labelIds of the 19 evaluated classes, in train-id order (cityscapesscripts' labels.py).
LABEL_ID_TO_TRAIN_ID = {
    label_id: train_id
    for train_id, label_id in enumerate([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])
}

# labelIds files hold the ids 0 (unlabeled) .. 33 (bicycle); license plates (id -1) are not drawn into them.
MAX_LABEL_ID = 33

_SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}
_IMAGE_SUFFIX = "_leftImg8bit.png"


class Cityscapes(SegmentationDataset):
    """Cityscapes with ``gtFine`` labels. ``use_train_ids``: "auto" (use ``*_labelTrainIds.png`` where it
    exists), True (require them) or False (always map ``*_labelIds.png``)."""

    num_classes = 19

    def __init__(
        self,
        root: str,
        split: str = "train",
        transforms: Callable | None = None,
        *,
        use_train_ids: bool | str = "auto",
        strict: bool = True,
    ):
        root = check_root(root, "Cityscapes")
        split = normalize_split(split, _SPLITS, "Cityscapes")
        if use_train_ids not in (True, False, "auto"):
            raise DatasetError(f"Cityscapes: use_train_ids must be True, False or 'auto', got {use_train_ids!r}")
        super().__init__(root, split, transforms, strict)
        self.class_names, self.palette = list(CITYSCAPES_CLASS_NAMES), list(CITYSCAPES_PALETTE)
        self._is_train_id: list[bool] = []
        image_root = os.path.join(root, "leftImg8bit", split)
        if not os.path.isdir(image_root):
            self.problems.append((image_root, "empty split: image folder not found"))
        else:
            for city in sorted(os.listdir(image_root)):
                city_dir = os.path.join(image_root, city)
                if not os.path.isdir(city_dir):
                    continue
                for name in sorted(os.listdir(city_dir)):
                    if name.endswith(_IMAGE_SUFFIX):
                        self._add(os.path.join(city_dir, name), city, name[: -len(_IMAGE_SUFFIX)], use_train_ids)
        self._finish_indexing(image_root)

    def _add(self, image: str, city: str, base: str, use_train_ids) -> None:
        gt_dir = os.path.join(self.root, "gtFine", self.split, city)
        train_ids = os.path.join(gt_dir, f"{base}_gtFine_labelTrainIds.png")
        label_ids = os.path.join(gt_dir, f"{base}_gtFine_labelIds.png")
        if use_train_ids is not False and os.path.isfile(train_ids):
            mask, is_train_id = train_ids, True
        elif use_train_ids is not True and os.path.isfile(label_ids):
            mask, is_train_id = label_ids, False
        else:
            expected = train_ids if use_train_ids is True else label_ids
            self.problems.append((image, f"missing mask: expected {expected}"))
            mask, is_train_id = None, False
        self.samples.append(Sample(image, mask, f"{city}/{base}"))
        self._is_train_id.append(is_train_id)

    def _to_train_ids(self, raw: np.ndarray, index: int) -> np.ndarray:
        if self._is_train_id[index]:
            return raw
        bad = np.unique(raw[(raw < 0) | (raw > MAX_LABEL_ID)])
        if bad.size:
            path = self.samples[index].mask
            shown = ", ".join(str(v) for v in bad[:8].tolist()) + (", ..." if bad.size > 8 else "")
            reason = f"out-of-range label values [{shown}]: Cityscapes labelIds are 0..{MAX_LABEL_ID}"
            raise DatasetError(f"{path}: {reason}", path, reason)
        return map_values(raw, LABEL_ID_TO_TRAIN_ID, default=self.ignore_index)
