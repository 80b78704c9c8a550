"""Segmentation, depth and detection data: datasets, dataset selection from a config or string, loaders, data checks."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .datasets import (
    ADE20K,
    COCO,
    IGNORE_INDEX,
    KITTI,
    NYU,
    Cityscapes,
    CocoJson,
    DepthDataset,
    DepthFolder,
    DetectionDataset,
    ImageMaskFolder,
    PascalVOC,
    SegmentationDataset,
    SyntheticBoxes,
    SyntheticDepth,
    SyntheticShapes,
)
from .io import DatasetError, load_image, load_mask
from .loaders import InfiniteDataloader, UnpaddedDistributedSampler, make_data_loader, worker_init_fn
from .options import dataset_options
from .transforms import PairTransforms

# Type names accepted in configs (case-insensitive); the official code spells ADE20K as here.
DATASETS: dict[str, type] = {
    "ade20k": ADE20K,
    "cityscapes": Cityscapes,
    "voc": PascalVOC,
    "pascalvoc": PascalVOC,
    "voc2012": PascalVOC,
    "folder": ImageMaskFolder,
    "imagemaskfolder": ImageMaskFolder,
    "synthetic": SyntheticShapes,
    "syntheticshapes": SyntheticShapes,
    # depth
    "nyu": NYU,
    "kitti": KITTI,
    "depthfolder": DepthFolder,
    "syntheticdepth": SyntheticDepth,
    # detection
    "coco": COCO,
    "coco2017": COCO,
    "cocojson": CocoJson,
    "syntheticboxes": SyntheticBoxes,
}
# Official split names (``ADE20K:split=TRAIN``) -> ours.
_OFFICIAL_SPLITS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _split_dataset_str(text: str) -> dict[str, str]:
    """``"ADE20K:split=TRAIN:root=/data/ade"`` -> ``{"type": "ADE20K", "split": "TRAIN", "root": "/data/ade"}``, every
    value as written."""
    name, *tokens = str(text).split(":")
    if not name.strip():
        raise DatasetError(f"dataset string {text!r} does not start with a dataset type")
    spec: dict[str, str] = {"type": name.strip()}
    last = None
    for token in tokens:
        if "=" in token:
            key, value = token.split("=", 1)
            key = key.strip()
            if not key:
                raise DatasetError(f"dataset string {text!r}: empty key in {token!r}")
            spec[key] = value
            last = key
        elif last is not None:
            spec[last] += ":" + token
        else:
            raise DatasetError(f"dataset string {text!r}: token {token!r} is not key=value")
    return spec


def parse_dataset_str(text: str) -> dict[str, Any]:
    """``"ADE20K:split=TRAIN:root=/data/ade"`` -> ``{"type": "ADE20K", "split": "TRAIN", "root": "/data/ade"}``.
    Other ``key=value`` tokens become constructor options (numbers and booleans parsed); a token without
    ``=`` continues the previous value, so a root may contain ``:``."""
    spec = _split_dataset_str(text)
    return {k: (v if k in ("type", "root", "split") else _parse_value(v)) for k, v in spec.items()}


def _spec_to_dict(config) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(config, Mapping):
        raise DatasetError(f"dataset config must be a string or a mapping, got {type(config).__name__}")
    spec = dict(config)
    options = spec.pop("options", None) or {}
    if not isinstance(options, Mapping):
        raise DatasetError(f"dataset config: 'options' must be a mapping, got {type(options).__name__}")
    spec.update(options)
    if "type" not in spec:
        raise DatasetError(f"dataset config has no 'type' (one of {sorted(set(DATASETS))}): {dict(config)}")
    return spec


def _dataset_class(type_name: str) -> type:
    """The dataset class of a type name as configs write it (case, ``_`` and ``-`` ignored)."""
    cls = DATASETS.get(str(type_name).strip().lower().replace("_", "").replace("-", ""))
    if cls is None:
        raise DatasetError(f"unknown dataset type {str(type_name)!r}; expected one of {sorted(set(DATASETS))}")
    return cls


def make_dataset(
    config_or_string: str | Mapping | None = None,
    /,
    *positional_transforms: Callable | None,
    dataset_str: str | None = None,
    transform: Callable | None = None,
    target_transform: Callable | None = None,
    transforms: Callable | None = None,
    default_root: str | None = None,
    **overrides,
) -> SegmentationDataset | DepthDataset:
    """Build a dataset from ``"ADE20K:split=TRAIN:root=/data/ade"`` or a dict / DictConfig (``type``, ``root``,
    ``split`` and constructor options, flat or under ``options``), given first or as ``dataset_str=`` (the official
    call form, ``make_dataset(dataset_str=..., transforms=...)``). ``transforms`` take and return (image, target);
    ``transform`` / ``target_transform`` (the official alternative) apply to the image and the target alone.
    ``overrides`` (e.g. ``root=...``, ``strict=False``) win over the description; ``default_root`` (a config's shared
    ``datasets.root``) applies when the dataset takes a root and none is given. Official split names TRAIN / VAL are
    accepted. Every option is checked against the dataset's constructor before it runs (`DatasetError`)."""
    if positional_transforms:  # the project's earlier form make_dataset(description, transforms)
        if len(positional_transforms) > 1 or transforms is not None:
            raise TypeError("make_dataset takes one positional argument (the description); transforms=... by keyword")
        warnings.warn("make_dataset(description, transforms) is deprecated: pass transforms=... by keyword",
                      DeprecationWarning, stacklevel=2)
        transforms = positional_transforms[0]
    if (config_or_string is None) == (dataset_str is None):
        raise DatasetError("make_dataset: give one dataset description (first argument or dataset_str=), "
                           f"got {'both' if dataset_str is not None else 'none'}")
    if transforms is not None and (transform is not None or target_transform is not None):
        raise DatasetError("make_dataset: give transforms (image and target together) or transform / target_transform, "
                           "not both")
    description = config_or_string if dataset_str is None else dataset_str
    # A dataset string's values are text, read as the types the dataset's constructor declares.
    spec = _split_dataset_str(description) if isinstance(description, str) else _spec_to_dict(description)
    text_keys = set(spec) - set(overrides) if isinstance(description, str) else set()
    shown = repr(description) if isinstance(description, str) else repr(spec)
    spec.update(overrides)
    cls = _dataset_class(spec.pop("type"))
    params = inspect.signature(cls.__init__).parameters
    if default_root and spec.get("root") is None and "root" in params:
        spec["root"] = default_root
    split = spec.get("split")
    if isinstance(split, str):
        spec["split"] = _OFFICIAL_SPLITS.get(split.strip(), split.strip())
    spec = {k: v for k, v in spec.items() if not (k in ("root", "split") and v is None)}
    options = dataset_options(cls, spec, text_keys, description=shown)
    if transform is not None or target_transform is not None:
        transforms = PairTransforms(transform, target_transform)
    dataset = cls(transforms=transforms, **options)
    for name, value in (("transform", transform), ("target_transform", target_transform)):
        if not hasattr(dataset, name):  # as the official make_dataset: the official datasets carry all three
            setattr(dataset, name, value)
    return dataset


__all__ = [
    "ADE20K",
    "COCO",
    "DATASETS",
    "IGNORE_INDEX",
    "Cityscapes",
    "CocoJson",
    "DatasetError",
    "DepthDataset",
    "DepthFolder",
    "DetectionDataset",
    "ImageMaskFolder",
    "InfiniteDataloader",
    "KITTI",
    "NYU",
    "PascalVOC",
    "SegmentationDataset",
    "SyntheticBoxes",
    "SyntheticDepth",
    "SyntheticShapes",
    "UnpaddedDistributedSampler",
    "load_image",
    "load_mask",
    "make_data_loader",
    "make_dataset",
    "parse_dataset_str",
    "worker_init_fn",
]  # fmt: skip
