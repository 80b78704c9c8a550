"""Segmentation datasets. Every dataset returns ``(image uint8 [3, H, W], label int64 [H, W])`` with labels
in train-id space (0..num_classes-1, 255 = ignore)."""

from .ade20k import ADE20K, ADE20K_CLASS_NAMES, ADE20K_PALETTE
from .base import IGNORE_INDEX, Sample, SegmentationDataset, reduce_zero_label
from .cityscapes import CITYSCAPES_CLASS_NAMES, CITYSCAPES_PALETTE, Cityscapes
from .folder import ImageMaskFolder
from .synthetic import SyntheticShapes
from .voc import VOC_CLASS_NAMES, VOC_PALETTE, PascalVOC

__all__ = [
    "ADE20K",
    "ADE20K_CLASS_NAMES",
    "ADE20K_PALETTE",
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "VOC_CLASS_NAMES",
    "VOC_PALETTE",
    "Cityscapes",
    "ImageMaskFolder",
    "PascalVOC",
    "Sample",
    "SegmentationDataset",
    "SyntheticShapes",
    "reduce_zero_label",
]  # fmt: skip
