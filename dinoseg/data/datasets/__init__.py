"""Segmentation datasets return ``(image uint8 [3, H, W], label int64 [H, W])`` with labels in train-id space
(0..num_classes-1, 255 = ignore); depth datasets ``(image uint8 [3, H, W], depth float32 [1, H, W])`` in stored
units (see ``depth_base``); detection datasets ``(image uint8 [3, H, W], target dict)`` with boxes and labels
(see ``coco``)."""

from .ade20k import ADE20K, ADE20K_CLASS_NAMES, ADE20K_PALETTE
from .base import IGNORE_INDEX, Sample, SegmentationDataset, reduce_zero_label
from .cityscapes import CITYSCAPES_CLASS_NAMES, CITYSCAPES_PALETTE, Cityscapes
from .coco import COCO, CocoJson, DetectionDataset, DetectionSample
from .depth_base import DepthDataset, DepthSample
from .depth_folder import DepthFolder
from .folder import ImageMaskFolder
from .kitti import KITTI
from .nyu import NYU
from .synthetic import SyntheticShapes
from .synthetic_boxes import SyntheticBoxes
from .synthetic_depth import SyntheticDepth
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
    "COCO",
    "Cityscapes",
    "CocoJson",
    "DepthDataset",
    "DepthFolder",
    "DepthSample",
    "DetectionDataset",
    "DetectionSample",
    "ImageMaskFolder",
    "KITTI",
    "NYU",
    "PascalVOC",
    "Sample",
    "SegmentationDataset",
    "SyntheticBoxes",
    "SyntheticDepth",
    "SyntheticShapes",
    "reduce_zero_label",
]  # fmt: skip
