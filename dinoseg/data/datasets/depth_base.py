"""Common machinery of the depth datasets.

A depth dataset returns ``(image uint8 [3, H, W], depth float32 [1, H, W])`` before transforms, the depth in
the dataset's stored units (NYU PNGs: millimetres, KITTI PNGs: 1/256 m) with 0 where there is no
measurement. `depth_scale` (stored units per metre) is the `normalization_constant` of the depth transforms,
which turn it into metres, as the official pipeline does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..io import DatasetError, _open
from .common import PairedDataset, size_mismatch

DEPTH_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F", "L")


@dataclass(frozen=True)
class DepthSample:
    image: str  # image file path
    depth: str | None  # depth file path; None when missing (only kept with strict=False)
    name: str  # unique name within the split (used to name predictions)
    focal: float | None = None  # focal length in pixels, when the split file gives it


def load_depth_file(path: str) -> np.ndarray:
    """The values stored in a depth map file as float32 [H, W]: 16-bit / 32-bit PNG or TIFF (``I;16``, ``I``,
    ``F``; 8-bit ``L`` is read too, check-data flags it) or a 2-D ``.npy`` array."""
    if path.lower().endswith(".npy"):
        if not os.path.isfile(path):
            raise DatasetError(f"depth map not found: {path}", path, "depth map not found")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            reason = f"unreadable or corrupt depth map: {type(e).__name__}: {e}"
            raise DatasetError(f"{path}: {reason}", path, reason) from None
        arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
        if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            reason = f"depth array must be numeric [H, W], got {arr.dtype} {arr.shape}"
            raise DatasetError(f"{path}: {reason}", path, reason)
        return arr.astype(np.float32)
    img = _open(path, "depth map")
    if img.mode not in _DEPTH_MODES:
        reason = f"depth map has image mode {img.mode!r}; expected a single-channel 16-bit (I;16) or float image"
        raise DatasetError(f"{path}: {reason}", path, reason)
    return np.asarray(img).astype(np.float32)


def depth_bit_depth(path: str) -> int | None:
    """Bits per stored value of an image depth map (8, 16, 32), None for arrays or unreadable files."""
    if path.lower().endswith(".npy"):
        return None
    try:
        img = _open(path, "depth map")
    except DatasetError:
        return None
    return {"L": 8, "I;16": 16, "I;16B": 16, "I;16L": 16}.get(img.mode, 32)


class DepthDataset(PairedDataset):
    """Base class: a list of (image, depth) files and the rule that turns stored depth values into ``[1, H, W]``
    float32 with 0 = missing; faults found while indexing are errors, or with ``strict=False`` kept in
    ``self.problems`` for check-data."""

    depth_scale: float = 1000.0  # stored units per metre
    invalid_value: float = 0.0  # stored value of pixels without a measurement
    max_depth: float | None = None  # largest depth (metres) a correct map of this dataset holds, for check-data
    eval_mask: str = "FULL"  # the dataset's standard evaluation crop (an `_EvalCropType` name)

    def depth_path(self, index: int) -> str | None:
        return self.samples[index].depth

    def _add_listed_sample(self, list_file: str, number: int, image: str, depth: str, focal: float | None,
                           image_root: str, depth_root: str) -> None:
        """The sample of line `number` of a split file (see `read_depth_split_file`), its paths relative to
        `image_root` / `depth_root`: a missing image drops it, a missing depth map keeps it without one (strict or
        check-data reports both)."""
        image_path = os.path.join(image_root, image.strip("/"))
        depth_path = os.path.join(depth_root, depth.strip("/"))
        if not os.path.isfile(image_path):
            self.problems.append((image_path, f"missing image (listed in {list_file}:{number})"))
            return
        if not os.path.isfile(depth_path):
            self.problems.append((depth_path, f"missing depth map (listed in {list_file}:{number})"))
            depth_path = None
        self.samples.append(DepthSample(image_path, depth_path, os.path.splitext(image.strip("/"))[0], focal))

    def load_raw_depth(self, index: int) -> np.ndarray:
        """The values stored in the depth file (float32 ``[H, W]``), before any conversion."""
        path = self.samples[index].depth
        if path is None:
            image = self.samples[index].image
            raise DatasetError(f"{image}: missing depth map", image, "missing depth map")
        return load_depth_file(path)

    def load_depth(self, index: int) -> torch.Tensor:
        """float32 ``[1, H, W]`` in stored units; missing measurements (the invalid value, non-finite or
        negative values) are 0."""
        raw = self.load_raw_depth(index)
        invalid = ~np.isfinite(raw) | (raw < 0)
        if not np.isnan(self.invalid_value):
            invalid |= raw == self.invalid_value
        depth = np.where(invalid, np.float32(0), raw).astype(np.float32)
        return torch.from_numpy(depth)[None]

    def load_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, depth) before transforms, checked to have the same size."""
        image, depth = self.load_image(index), self.load_depth(index)
        if image.shape[-2:] != depth.shape[-2:]:
            path = self.depth_path(index)
            reason = size_mismatch("depth", self.image_path(index), tuple(image.shape[-2:]), tuple(depth.shape[-2:]))
            raise DatasetError(f"{path}: {reason}", path, reason)
        return image, depth

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, samples={len(self)}, "
                f"depth_scale={self.depth_scale})")


# Split spellings of the datasets described by split files (NYU, KITTI).
SPLIT_FILE_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}


def split_file_root(root: str | None, dataset: str) -> str:
    """The root folder of a dataset described by split files, which must exist."""
    if root is None or not os.path.isdir(os.path.expanduser(str(root))):
        raise DatasetError(f"{dataset}: root folder not found: {root}")
    return os.path.expanduser(str(root))


def read_depth_split_file(path: str, dataset: str, problems: list) -> list[tuple[int, str, str | None, float | None]]:
    """Lines ``<image> <depth | None> [<focal>]`` of a split file -> (line number, image, depth, focal).
    Malformed lines are recorded in `problems` and skipped."""
    if not os.path.isfile(path):
        raise DatasetError(f"{dataset}: split file not found: {path}")
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            focal = None
            if len(fields) == 3:
                try:
                    focal = float(fields[2])
                except ValueError:
                    fields = []
            if len(fields) not in (2, 3):
                problems.append((f"{path}:{number}", f"malformed line {line.strip()!r}: expected '<image> <depth> [<focal>]'"))
                continue
            depth = None if fields[1] == "None" else fields[1]
            entries.append((number, fields[0], depth, focal))
    return entries
