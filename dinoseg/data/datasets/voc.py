"""Pascal VOC 2012 segmentation (21 classes including background).

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClass/<id>.png          # palette ('P') PNGs: pixel value = class index, 255 = border
    VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

Palette PNGs decode straight to class indices (PIL mode 'P'); the 255 object borders are ignored.
``mask_dir="SegmentationClassAug"`` reads the SBD-augmented single-channel masks instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..io import read_list_file
from .base import Sample, SegmentationDataset, check_root

VOC_CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOC devkit colour map: the bits of the index, interleaved over R, G, B from the high bit down."""
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append((r, g, b))
    return colors


VOC_PALETTE = voc_colormap(21)


class PascalVOC(SegmentationDataset):
    """Pascal VOC 2012. ``root`` is ``VOC2012`` (or ``VOCdevkit`` holding it); ``split`` names a file in
    ``ImageSets/Segmentation`` (train, val, trainval...)."""

    num_classes = 21

    def __init__(
        self,
        root: str,
        split: str = "train",
        transforms: Callable | None = None,
        *,
        mask_dir: str = "SegmentationClass",
        strict: bool = True,
    ):
        root = check_root(root, "PascalVOC")
        if not os.path.isdir(os.path.join(root, "JPEGImages")) and os.path.isdir(os.path.join(root, "VOC2012")):
            root = os.path.join(root, "VOC2012")
        split = str(split).strip().lower()
        split = {"training": "train", "validation": "val"}.get(split, split)
        super().__init__(root, split, transforms, strict)
        self.class_names, self.palette = list(VOC_CLASS_NAMES), list(VOC_PALETTE)
        # Masks re-saved as RGB by an image editor still decode exactly through the VOC colours (the border,
        # index 255, is (224, 224, 192)); other colours are errors.
        colormap = voc_colormap(256)
        self.color_mask_palette = [
            colormap[i] if i < self.num_classes or i == self.ignore_index else (-1, -1, -1) for i in range(256)
        ]
        list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(list_file):
            self.problems.append((list_file, f"empty split: split file for {split!r} not found"))
        else:
            for image_id in read_list_file(list_file):
                image = os.path.join(root, "JPEGImages", image_id + ".jpg")
                mask = os.path.join(root, mask_dir, image_id + ".png")
                if not os.path.isfile(image):
                    self.problems.append((image, f"missing image (listed in {list_file})"))
                    continue
                if not os.path.isfile(mask):
                    self.problems.append((image, f"missing mask: expected {mask}"))
                    mask = None
                self.samples.append(Sample(image, mask, image_id))
        self._finish_indexing(list_file)
