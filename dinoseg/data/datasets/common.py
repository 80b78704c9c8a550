"""What the segmentation and the depth datasets share: a split indexed as (image, target) samples with the faults
found on the way kept for check-data, the images of a folder dataset's split, and datasets generated on the fly."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import IMAGE_EXTENSIONS, DatasetError, load_image, read_list_file


def size_mismatch(kind: str, image_path, image_hw, target_hw) -> str:
    """The fault of an image and its target (`kind`: "mask", "depth") of different sizes."""
    return f"image/{kind} size mismatch: {kind} is {target_hw} (H, W) but image {image_path} is {image_hw}"


class PairedDataset(Dataset):
    """Base of the datasets that pair each image with a target (a label mask, a depth map): `samples` (each with an
    `image` path and a `name`) indexed at construction; subclasses read a sample, before transforms, in
    `load_sample`.

    With ``strict=True`` (the default) a fault found while indexing (a missing file, an empty split) is an error at
    construction; with ``strict=False`` the faults are recorded in ``self.problems`` (pairs ``(path, fault)``) for
    check-data.
    """

    def __init__(self, root: str | None, split: str | None, transforms: Callable | None = None, strict: bool = True):
        self.root = root
        self.split = split
        self.transforms = transforms
        self.strict = strict
        self.samples: list = []
        self.problems: list[tuple[str, str]] = []

    def _finish_indexing(self, where: str) -> None:
        """Called by subclasses once ``samples``/``problems`` are filled: enforce ``strict``."""
        if not self.samples:
            self.problems.append((where, f"empty split: no samples for split {self.split!r}"))
        if self.strict and self.problems:
            path, fault = self.problems[0]
            more = f" (and {len(self.problems) - 1} more problem(s); run check-data)" if len(self.problems) > 1 else ""
            raise DatasetError(f"{type(self).__name__}: {path}: {fault}{more}")

    def __len__(self) -> int:
        return len(self.samples)

    def sample_name(self, index: int) -> str:
        return self.samples[index].name

    def image_path(self, index: int) -> str | None:
        return self.samples[index].image

    def load_image(self, index: int) -> torch.Tensor:
        """RGB ``uint8`` ``[3, H, W]``."""
        return load_image(self.samples[index].image)

    def load_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.load_sample(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def list_images(folder: str) -> list[str]:
    """The image file names in `folder`, sorted (none when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))


def find_image(image_root: str, entry: str) -> str | None:
    """The image a split file lists as `entry` (with or without its extension), relative to `image_root`."""
    entry = entry.replace("\\", "/")
    if entry.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(image_root, entry)):
        return entry
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if os.path.isfile(os.path.join(image_root, entry + ext)):
            return entry + ext
    return None


def folder_split_images(root: str, image_root: str, split: str | None, problems: list) -> tuple[list[str], str]:
    """The images of a folder dataset's `split`, relative to `image_root`, and where they are listed: all images in
    `image_root` (`split` None), else the names in ``root/splits/<split>.txt`` or ``root/<split>.txt``, else the
    images in ``image_root/<split>/``. Listed images that do not exist, and a split found nowhere, go to `problems`."""
    if split is None:
        return list_images(image_root), image_root
    lists = [os.path.join(root, "splits", f"{split}.txt"), os.path.join(root, f"{split}.txt")]
    list_file = next((p for p in lists if os.path.isfile(p)), None)
    split_dir = os.path.join(image_root, split)
    if list_file is not None:
        names = []
        for entry in read_list_file(list_file):
            image = find_image(image_root, entry)
            if image is None:
                problems.append((os.path.join(image_root, entry), f"missing image (listed in {list_file})"))
            else:
                names.append(image)
        return names, list_file
    if os.path.isdir(split_dir):
        return [os.path.join(split, n) for n in list_images(split_dir)], split_dir
    problems.append((image_root, f"empty split: no {lists[0]}, {lists[1]} or folder {split_dir}"))
    return [], image_root


_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class GeneratedSamples:
    """Mixed in before the base class of a dataset generated on the fly (no files to miss, no paths): `num_samples`
    samples named ``<split>_<index>``, sample i a function of (seed, split, i) only, so that processes and loader
    workers agree on the data."""

    num_samples: int
    split: str

    def _set_samples(self, num_samples: int, image_size: int | tuple[int, int], seed: int, min_side: int) -> None:
        name = type(self).__name__
        if int(num_samples) < 1:
            raise DatasetError(f"{name}: num_samples={num_samples} must be >= 1")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
        if len(size) != 2 or min(size) < min_side:
            raise DatasetError(f"{name}: image_size={image_size} must be an int or (height, width) >= {min_side}")
        if int(seed) < 0:
            raise DatasetError(f"{name}: seed={seed} must be >= 0")
        self.num_samples = int(num_samples)
        self.image_size = size
        self.seed = int(seed)
        self._split_code = _SPLIT_CODES.get(self.split, zlib.crc32(self.split.encode()))

    def _rng(self, index: int) -> np.random.Generator:
        """The random stream of sample `index` (any other index is an IndexError)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {self.num_samples} samples")
        return np.random.default_rng([self.seed, self._split_code, index])

    def __len__(self) -> int:
        return self.num_samples

    def sample_name(self, index: int) -> str:
        return f"{self.split}_{index:06d}"

    def image_path(self, index: int) -> None:
        return None
