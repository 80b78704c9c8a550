"""A dataset of your own: an image folder and a mask folder matched by file stem.

    root/images/<name>.{jpg,png,...}        root/masks/<name>.png        (single-channel or palette PNG)
    root/images/<split>/...                 root/masks/<split>/...       (optional per-split folders)
    root/splits/<split>.txt or root/<split>.txt                          (optional lists of names)
    root/classes.json | classes.yaml | classes.yml                       (optional class description)

The class file is either a list of names, a mapping ``{"0": "background", "1": "cat", ...}`` or a mapping with
keys ``classes`` (names), and optionally ``palette`` ([[r, g, b], ...]), ``ignore_index`` (the value of
unlabelled pixels in the mask files, default 255) and ``reduce_zero_label`` (mask value 0 = unlabelled).
Mask values are class indices. Colour (RGB) masks are decoded through ``palette`` (colour i -> value i).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from ..io import LOSSY_EXTENSIONS, MASK_EXTENSIONS, DatasetError
from .base import IGNORE_INDEX, Sample, SegmentationDataset, check_root
from .common import folder_split_images

CLASS_FILES = ("classes.json", "classes.yaml", "classes.yml")
_CLASS_KEYS = {"classes", "class_names", "palette", "ignore_index", "reduce_zero_label"}


def load_class_file(path: str) -> dict:
    """Read a class description file into ``{"class_names": [...], "palette": ..., ...}`` (keys present only)."""
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise DatasetError(f"cannot parse class file {path}: {type(e).__name__}: {e}") from None
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict):
        raise DatasetError(f"class file {path}: expected a list of class names or a mapping, got {type(data).__name__}")
    if data and all(str(k).isdigit() for k in data):  # {"0": "background", "1": "cat"}
        keys = sorted(int(k) for k in data)
        if keys != list(range(len(keys))):
            raise DatasetError(f"class file {path}: class indices must be 0..{len(keys) - 1}, got {keys}")
        data = {"classes": [data[k] if k in data else data[str(k)] for k in keys]}
    unknown = set(data) - _CLASS_KEYS
    if unknown:
        raise DatasetError(f"class file {path}: unknown key {min(unknown)!r}; expected {sorted(_CLASS_KEYS)}")
    out = {}
    names = data.get("classes", data.get("class_names"))
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"class file {path}: 'classes' must be a list of names")
        out["class_names"] = names
    if data.get("palette") is not None:
        out["palette"] = _check_palette(data["palette"], path)
    for key in ("ignore_index", "reduce_zero_label"):
        if key in data:
            out[key] = data[key]
    return out


def _check_palette(palette, where: str) -> list[tuple[int, int, int]]:
    try:
        colors = [tuple(int(v) for v in c) for c in palette]
    except (TypeError, ValueError):
        colors = []
    if not colors or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
        raise DatasetError(f"{where}: palette must be a list of [r, g, b] triples in 0..255")
    return colors


class ImageMaskFolder(SegmentationDataset):
    """``images/`` + ``masks/`` with matching stems. Arguments given here override the class file."""

    def __init__(
        self,
        root: str,
        split: str | None = None,
        transforms: Callable | None = None,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int | None = None,
        reduce_zero_label: bool | None = None,
        classes_file: str | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
        mask_suffix: str = "",
        strict: bool = True,
    ):
        root = check_root(root, "ImageMaskFolder")
        split = None if split is None or str(split).lower() in ("", "all", "none") else str(split)
        super().__init__(root, split, transforms, strict)

        info = {}
        if classes_file is not None:
            path = classes_file if os.path.isabs(classes_file) else os.path.join(root, classes_file)
            if not os.path.isfile(path):
                raise DatasetError(f"ImageMaskFolder: class file not found: {path}")
            info = load_class_file(path)
        else:
            found = [os.path.join(root, n) for n in CLASS_FILES if os.path.isfile(os.path.join(root, n))]
            if found:
                info = load_class_file(found[0])
        names = list(class_names) if class_names is not None else info.get("class_names")
        if num_classes is None:
            if names is None:
                raise DatasetError(
                    f"ImageMaskFolder: number of classes unknown for {root}: add a classes.json (list of names) "
                    "there or pass num_classes"
                )
            num_classes = len(names)
        if names is None:
            names = [f"class_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise DatasetError(f"ImageMaskFolder: {len(names)} class names for num_classes={num_classes}")
        if not 1 <= num_classes <= 255:
            raise DatasetError(f"ImageMaskFolder: num_classes={num_classes} must be in 1..255 (255 = ignore)")
        self.num_classes = int(num_classes)
        self.class_names = names
        palette = palette if palette is not None else info.get("palette")
        self.palette = _check_palette(palette, "ImageMaskFolder") if palette is not None else None
        self.color_mask_palette = self.palette  # colour masks: colour i -> value i
        self.ignore_value = int(ignore_index if ignore_index is not None else info.get("ignore_index", IGNORE_INDEX))
        self.reduce_zero_label = bool(
            reduce_zero_label if reduce_zero_label is not None else info.get("reduce_zero_label", False)
        )
        self.mask_suffix = mask_suffix
        self._index(os.path.join(root, image_dir), os.path.join(root, mask_dir))

    def _index(self, image_root: str, mask_root: str) -> None:
        names, where = folder_split_images(self.root, image_root, self.split, self.problems)
        for rel in names:
            stem = os.path.splitext(rel)[0]
            image = os.path.join(image_root, rel)
            mask = self._find_mask(mask_root, stem)
            if mask is None:
                lossy = [stem + self.mask_suffix + e for e in LOSSY_EXTENSIONS]
                lossy = [p for p in lossy if os.path.isfile(os.path.join(mask_root, p))]
                hint = (
                    f" (found {lossy[0]}, but masks must be lossless PNG: JPEG compression changes label values)"
                    if lossy
                    else ""
                )
                expected = os.path.join(mask_root, stem + self.mask_suffix + ".png")
                self.problems.append((image, f"missing mask: expected {expected}{hint}"))
            self.samples.append(Sample(image, mask, stem.replace(os.sep, "/")))
        self._finish_indexing(where)

    def _find_mask(self, mask_root: str, stem: str) -> str | None:
        for ext in MASK_EXTENSIONS:
            path = os.path.join(mask_root, stem + self.mask_suffix + ext)
            if os.path.isfile(path):
                return path
        return None

    def _to_train_ids(self, raw: np.ndarray, index: int) -> np.ndarray:
        if self.ignore_value != self.ignore_index:
            raw = raw.copy()
            raw[raw == self.ignore_value] = self.ignore_index
        return raw
