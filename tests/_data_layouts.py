"""Tiny on-disk copies of the dataset layouts, with the real file names and label encodings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dinoseg.data.datasets.voc import voc_colormap


def _rgb(rng, h, w) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _blocks(rng, h, w, values, block=4) -> np.ndarray:
    """A label map of constant blocks drawn from ``values`` (every value appears when there is room)."""
    gh, gw = -(-h // block), -(-w // block)
    grid = rng.choice(values, size=(gh, gw))
    flat = grid.reshape(-1)
    flat[: min(len(values), flat.size)] = values[: flat.size]
    return np.kron(grid, np.ones((block, block), dtype=grid.dtype))[:h, :w]


def make_ade20k(root: Path, n_train: int = 3, n_val: int = 2, with_lists: bool = False, seed: int = 0) -> dict:
    """ADEChallengeData2016 layout. Annotations: 8-bit PNG, 0 = other, 1..150 = classes. Returns the raw
    annotation arrays by (split, stem)."""
    rng = np.random.default_rng(seed)
    raw = {}
    for split, sub, n in (("train", "training", n_train), ("val", "validation", n_val)):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(n):
            stem = f"ADE_{split}_{i + 1:08d}"
            h, w = 24 + 4 * i, 32 - 4 * i
            _rgb(rng, h, w).save(root / "images" / sub / f"{stem}.jpg", quality=95)
            ann = _blocks(rng, h, w, np.array([0, 1, 2, 75, 150]))
            Image.fromarray(ann.astype(np.uint8)).save(root / "annotations" / sub / f"{stem}.png")
            raw[(split, stem)] = ann
            names.append(f"{sub}/{stem}.jpg")
        if with_lists:
            (root / f"ADE20K_object150_{split}.txt").write_text("\n".join(names) + "\n")
    return raw


CITY_LABEL_IDS = np.array([0, 1, 4, 7, 8, 11, 21, 23, 24, 26, 33])
CITY_EXPECTED = {0: 255, 1: 255, 4: 255, 7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}


def make_cityscapes(root: Path, per_city: int = 2, train_ids_for: tuple = (), seed: int = 0) -> dict:
    """leftImg8bit + gtFine with ``*_gtFine_labelIds.png`` (and ``*_labelTrainIds.png`` for the stems in
    ``train_ids_for``). Returns the labelIds arrays by (split, city/stem)."""
    rng = np.random.default_rng(seed)
    raw = {}
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
        for city in cities:
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_city):
                base = f"{city}_{i:06d}_000019"
                _rgb(rng, 16, 32).save(img_dir / f"{base}_leftImg8bit.png")
                ids = _blocks(rng, 16, 32, CITY_LABEL_IDS)
                Image.fromarray(ids.astype(np.uint8)).save(gt_dir / f"{base}_gtFine_labelIds.png")
                Image.fromarray(ids.astype(np.uint8)).save(gt_dir / f"{base}_gtFine_instanceIds.png")
                if f"{city}/{base}" in train_ids_for:
                    train = np.vectorize(CITY_EXPECTED.get)(ids).astype(np.uint8)
                    Image.fromarray(train).save(gt_dir / f"{base}_gtFine_labelTrainIds.png")
                raw[(split, f"{city}/{base}")] = ids
    return raw


def make_voc(root: Path, seed: int = 0) -> dict:
    """VOCdevkit/VOC2012 with palette ('P') PNG masks, 255 object borders. Returns masks by image id."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    palette = [v for c in voc_colormap(256) for v in c]
    masks = {}
    ids = {"train": ["2007_000032", "2007_000039", "2008_000002"], "val": ["2007_000033", "2009_000012"]}
    for split, names in ids.items():
        for image_id in names:
            h, w = 20, 28
            _rgb(rng, h, w).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            mask = _blocks(rng, h, w, np.array([0, 1, 15, 20]))
            mask[:, 8] = 255  # an object border
            pimg = Image.frombytes("P", (w, h), mask.astype(np.uint8).tobytes())
            pimg.putpalette(palette)
            pimg.save(voc / "SegmentationClass" / f"{image_id}.png")
            masks[image_id] = mask
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return masks


def make_folder(root: Path, stems=("a", "b", "c"), num_classes: int = 3, classes_file: str | None = "json",
                size=(16, 20), seed: int = 0) -> dict:
    """images/ + masks/ (8-bit PNG class indices, a few 255 pixels) and an optional class file."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    masks = {}
    for stem in stems:
        _rgb(rng, *size).save(root / "images" / f"{stem}.png")
        mask = _blocks(rng, *size, np.arange(num_classes))
        mask[0, 0] = 255
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{stem}.png")
        masks[stem] = mask
    names = [f"thing{i}" for i in range(num_classes)]
    if classes_file == "json":
        palette = [[i * 40, 0, 0] for i in range(num_classes)]
        (root / "classes.json").write_text(json.dumps({"classes": names, "palette": palette}))
    elif classes_file == "yaml":
        (root / "classes.yaml").write_text("classes:\n" + "".join(f"  - {n}\n" for n in names))
    return masks


def write_split(path: Path, names) -> None:
    os.makedirs(path.parent, exist_ok=True)
    path.write_text("\n".join(names) + "\n")
