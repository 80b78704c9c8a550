"""Common machinery of the on-disk segmentation datasets.

Every dataset returns labels in "train id" space: values ``0 .. num_classes-1`` plus ``ignore_index`` (255).
The conversion from the file encoding (Cityscapes labelIds, ADE20K's 0 = "other", ...) happens here, in
:meth:`SegmentationDataset.load_label`, and nowhere else: transforms, losses and metrics must not re-apply
``reduce_zero_label``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..io import DatasetError, load_mask
from .common import PairedDataset, size_mismatch

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Sample:
    image: str  # image file path
    mask: str | None  # label file path; None when missing (only kept with strict=False)
    name: str  # unique name within the split, e.g. "validation/ADE_val_00000001" -> used to save predictions


def reduce_zero_label(label, ignore_index: int = IGNORE_INDEX):
    """0 -> ignore, k -> k-1; a value already equal to ``ignore_index`` stays ignored (as mmseg). For numpy arrays
    and tensors (int64 out)."""
    if isinstance(label, torch.Tensor):
        label = label.long()
        return torch.where((label == 0) | (label == ignore_index), torch.full_like(label, ignore_index), label - 1)
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == ignore_index)] = ignore_index
    return out


def map_values(label: np.ndarray, mapping: dict[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    """Map label values through ``mapping``; values not in it become ``default``."""
    size = max(int(label.max(initial=0)), max(mapping)) + 1
    lut = np.full(size, default, dtype=np.int64)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[label]


def normalize_split(split: str, aliases: dict[str, str], dataset: str) -> str:
    """Map user spellings (``TRAIN``, ``training``, ``val``...) to the dataset's split key."""
    key = str(split).strip().lower()
    if key not in aliases:
        raise DatasetError(f"{dataset}: unknown split {split!r}; expected one of {sorted(set(aliases))}")
    return aliases[key]


def check_root(root, dataset: str) -> str:
    if root is None or str(root) == "":
        raise DatasetError(f"{dataset}: no root given (the dataset folder)")
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset} root not found: {root}")
    return root


class SegmentationDataset(PairedDataset):
    """Base class: a list of (image, mask) files plus the rule that turns mask values into train ids; faults found
    while indexing are errors, or with ``strict=False`` kept in ``self.problems`` for ``check_dataset``."""

    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]] | None = None
    color_mask_palette: list[tuple[int, int, int]] | None = None  # decodes RGB masks (colour i -> value i)
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = False

    # --- construction helpers -------------------------------------------------------------------------------
    def _finish_indexing(self, where: str) -> None:
        super()._finish_indexing(where)
        if len(self.class_names) != self.num_classes:
            raise DatasetError(f"{type(self).__name__}: {len(self.class_names)} class names for {self.num_classes} classes")

    # --- per-sample access ----------------------------------------------------------------------------------
    def mask_path(self, index: int) -> str | None:
        return self.samples[index].mask

    def load_raw_mask(self, index: int) -> np.ndarray:
        """The values stored in the mask file (int64 ``[H, W]``), before any conversion."""
        path = self.samples[index].mask
        if path is None:
            image = self.samples[index].image
            raise DatasetError(f"{image}: missing mask", image, "missing mask")
        return load_mask(path, palette=self.color_mask_palette)

    def _to_train_ids(self, raw: np.ndarray, index: int) -> np.ndarray:
        """Dataset-specific file encoding -> train ids (before ``reduce_zero_label``). Default: identity."""
        return raw

    def load_label(self, index: int) -> torch.Tensor:
        """int64 ``[H, W]`` in train-id space. The ONLY place where ``reduce_zero_label`` is applied."""
        label = self._to_train_ids(self.load_raw_mask(index), index)
        if self.reduce_zero_label:
            label = reduce_zero_label(label, self.ignore_index)
        return torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))

    def label_fault(self, label: torch.Tensor) -> str | None:
        """Describe label values that are neither a class nor ignore (the cause of silent 0 / NaN IoU and of
        device-side asserts in the loss); None when the label map is valid."""
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if not bool(bad.any()):
            return None
        values = torch.unique(label[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        hint = " (is reduce_zero_label set right?)" if self.num_classes in values else ""
        return (
            f"label values [{shown}] are outside the {self.num_classes} classes 0..{self.num_classes - 1} and are "
            f"not the ignore index {self.ignore_index}{hint}"
        )

    def load_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, label) before transforms, validated: same size, label values are classes or ignore."""
        image = self.load_image(index)
        label = self.load_label(index)
        if tuple(image.shape[-2:]) != tuple(label.shape):
            reason = size_mismatch("mask", self.image_path(index), tuple(image.shape[-2:]), tuple(label.shape))
            raise DatasetError(f"{self.mask_path(index)}: {reason}", self.mask_path(index), reason)
        fault = self.label_fault(label)
        if fault is not None:
            raise DatasetError(f"{self.mask_path(index)}: {fault}", self.mask_path(index), fault)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, samples={len(self)}, "
            f"num_classes={self.num_classes}, reduce_zero_label={self.reduce_zero_label})"
        )


def hex_palette(text: str) -> list[tuple[int, int, int]]:
    """``"787878 b47878 ..."`` -> ``[(120, 120, 120), (180, 120, 120), ...]`` (compact palette tables)."""
    return [(int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)) for h in text.split()]
