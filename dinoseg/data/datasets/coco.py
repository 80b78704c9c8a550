"""Object detection datasets in the COCO format: the official COCO 2017 layout, any COCO-format export, and the
base class every detection dataset shares (the synthetic one included).

A detection dataset returns ``(image uint8 [3, H, W], target)`` before transforms, with ``target``::

    boxes      tv_tensors.BoundingBoxes float32 [N, 4], XYXY in pixels of the image, clamped to it
    labels     int64 [N]: contiguous labels 0..C-1 (category ids sorted), or the category ids themselves
               with ``category_ids_as_labels=True`` (the released 91-class COCO detector's labels)
    image_id   int64 [] (the file's image id)
    orig_size  int64 [2] (H, W) of the image as stored
    size       int64 [2] (H, W); the transforms update it (``dinoseg.eval.detection.transforms``)

Crowd annotations (``iscrowd=1``) and boxes without area are never in ``target``: the loss must not match them.
They stay in the ground truth of the evaluation (`coco_gt`), where pycocotools ignores crowd regions as COCO does.

Category ids are kept as the file gives them (non-contiguous in COCO, 0 for Roboflow's super-category):
``label_to_category_id`` / ``category_id_to_label`` map between them and the labels, ``class_names[label]``
names a label.

Faults are found while indexing, each naming the file and the annotation: a box outside its image (by more than
``BOX_TOLERANCE`` pixels), a negative size, a box that is not four finite numbers, an unknown category or image
id, a duplicate image / annotation / category id, a missing image. With ``strict=True`` (the default) the first
one is an error (`DatasetError`); with ``strict=False`` they are kept in ``problems`` for check-data, and the
faulty annotations are left out. Boxes of zero width or height are only warnings (``warnings``): COCO 2017
train holds two (annotations 918 and 2206849), which the official recipe drops from its targets as done here.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..io import DatasetError, image_size
from .base import check_root, normalize_split
from .common import PairedDataset, size_mismatch

BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in exports) before it is a fault
UNUSED_CATEGORY_NAME = "N/A"  # class_names entry of a label that is no category (category_ids_as_labels)


@dataclass(frozen=True)
class DetectionSample:
    """One image and its annotations as the file gives them (arrays of equal length, crowd ones included)."""

    image: str | None  # image file path; None for generated data
    name: str  # the file_name of the annotation file (unique within the split)
    image_id: int
    height: int
    width: int
    annotation_ids: np.ndarray  # int64 [n]
    boxes: np.ndarray  # float64 [n, 4], XYWH in pixels (the COCO "bbox")
    category_ids: np.ndarray  # int64 [n]
    iscrowd: np.ndarray  # bool [n]
    areas: np.ndarray  # float64 [n], the file's "area" (w * h when absent): COCO's small / medium / large


def make_sample(image, name, image_id, height, width, annotations: list[tuple[int, list[float], int, bool, float]]):
    """A `DetectionSample` from (annotation id, XYWH box, category id, iscrowd, area) tuples."""
    n = len(annotations)
    return DetectionSample(
        image=image,
        name=name,
        image_id=int(image_id),
        height=int(height),
        width=int(width),
        annotation_ids=np.asarray([a[0] for a in annotations], dtype=np.int64).reshape(n),
        boxes=np.asarray([a[1] for a in annotations], dtype=np.float64).reshape(n, 4),
        category_ids=np.asarray([a[2] for a in annotations], dtype=np.int64).reshape(n),
        iscrowd=np.asarray([a[3] for a in annotations], dtype=bool).reshape(n),
        areas=np.asarray([a[4] for a in annotations], dtype=np.float64).reshape(n),
    )


class DetectionDataset(PairedDataset):
    """Base of the detection datasets: images with their boxes, category ids kept, labels contiguous inside.

    Subclasses fill ``samples`` (`DetectionSample`) and call `_set_categories`; generated datasets override
    `annotations` instead. The interface the detection task uses:

    - ``num_classes`` (logits of the head: C, or the largest category id + 1 with ``category_ids_as_labels``),
      ``class_names`` (one per label), ``category_ids`` (sorted), ``category_names`` (id -> name),
      ``label_to_category_id`` / ``category_id_to_label`` (dicts);
    - ``dataset[i]`` -> ``(image, target)`` after ``transforms`` (see the module docstring for ``target``);
    - `image_id`, `annotations` (the file's view of an image, crowd boxes included), `coco_gt` (the ground truth
      in COCO format, for pycocotools), `write_coco` (the dataset as a COCO folder: PNG images + JSON).
    """

    category_ids: list[int]
    category_names: dict[int, str]
    category_ids_as_labels: bool = False

    def __init__(self, root, split, transforms: Callable | None = None, strict: bool = True):
        super().__init__(root, split, transforms, strict=strict)
        self.warnings: list[tuple[str, str]] = []  # (path, fault) that do not stop training: zero-size boxes

    # --- categories and labels ------------------------------------------------------------------------------
    def _set_categories(self, names: Mapping[int, str], category_ids_as_labels: bool) -> None:
        if not names:
            raise DatasetError(f"{type(self).__name__}: no categories")
        self.category_ids = sorted(int(k) for k in names)
        self.category_names = {k: str(names[k]) for k in self.category_ids}
        self.category_ids_as_labels = bool(category_ids_as_labels)
        if self.category_ids_as_labels:
            self.num_classes = self.category_ids[-1] + 1
            self.class_names = [self.category_names.get(k, UNUSED_CATEGORY_NAME) for k in range(self.num_classes)]
            self.label_to_category_id = {k: k for k in self.category_ids}
        else:
            self.num_classes = len(self.category_ids)
            self.class_names = [self.category_names[k] for k in self.category_ids]
            self.label_to_category_id = dict(enumerate(self.category_ids))
        self.category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}

    def labels_of(self, category_ids: np.ndarray) -> np.ndarray:
        """Category ids -> labels (int64)."""
        return np.asarray([self.category_id_to_label[int(c)] for c in category_ids], dtype=np.int64)

    # --- per-sample access ----------------------------------------------------------------------------------
    def annotations(self, index: int) -> DetectionSample:
        return self.samples[index]

    def image_id(self, index: int) -> int:
        return self.annotations(index).image_id

    def sample_name(self, index: int) -> str:
        return self.annotations(index).name

    def load_target(self, index: int) -> dict[str, torch.Tensor]:
        """The training target of image `index` before transforms (module docstring): crowd boxes and boxes
        without area (after clamping to the image) left out."""
        # Imported here: torchvision's import pulls in torch._dynamo (a second or more), which indexing and
        # checking a dataset never need.
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        ann = self.annotations(index)
        h, w = ann.height, ann.width
        keep = ~ann.iscrowd & (ann.boxes[:, 2] > 0) & (ann.boxes[:, 3] > 0)
        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(ann.boxes[keep], dtype=torch.float32), format="XYWH",
                                         canvas_size=(h, w))
        boxes = F.clamp_bounding_boxes(F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY))
        labels = torch.as_tensor(self.labels_of(ann.category_ids[keep]), dtype=torch.int64)
        has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {
            "boxes": tv_tensors.wrap(boxes[has_area], like=boxes),
            "labels": labels[has_area],
            "image_id": torch.tensor(ann.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }

    def load_sample(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(image, target) before transforms; an image whose size is not the one its annotations give (an EXIF
        rotation applied by the annotation tool, a resized copy) is an error naming the file."""
        image = self.load_image(index)
        ann = self.annotations(index)
        if tuple(image.shape[-2:]) != (ann.height, ann.width):
            path = self.image_path(index) or ann.name
            reason = size_mismatch("annotations", path, tuple(image.shape[-2:]), (ann.height, ann.width))
            raise DatasetError(f"{path}: {reason}", path, reason)
        return image, self.load_target(index)

    # --- the ground truth as a COCO file --------------------------------------------------------------------
    def coco_gt(self) -> dict:
        """The split's ground truth in COCO format (``images``, ``annotations`` with ``bbox`` XYWH, ``area`` and
        ``iscrowd``, ``categories``): what pycocotools evaluates against. Every image is listed, annotated or
        not; crowd and zero-size boxes are kept, as in the file."""
        images, annotations = [], []
        for i in range(len(self)):
            ann = self.annotations(i)
            images.append({"id": ann.image_id, "file_name": ann.name, "height": ann.height, "width": ann.width})
            for k in range(len(ann.annotation_ids)):
                annotations.append({
                    "id": int(ann.annotation_ids[k]),
                    "image_id": ann.image_id,
                    "category_id": int(ann.category_ids[k]),
                    "bbox": [float(v) for v in ann.boxes[k]],
                    "area": float(ann.areas[k]),
                    "iscrowd": int(ann.iscrowd[k]),
                })  # fmt: skip
        categories = [{"id": c, "name": self.category_names[c]} for c in self.category_ids]
        return {"images": images, "annotations": annotations, "categories": categories}

    def write_coco(self, folder: str, *, overwrite: bool = False) -> tuple[str, str]:
        """Write the split as a COCO-format folder: ``folder/images/<name>.png`` (lossless: the images read back
        identical) and ``folder/annotations.json``; returns (images folder, annotation file), the arguments of
        `CocoJson`. An existing annotation file is refused unless ``overwrite``."""
        images_dir = os.path.join(folder, "images")
        ann_path = os.path.join(folder, "annotations.json")
        if os.path.exists(ann_path) and not overwrite:
            raise DatasetError(f"{ann_path} exists; pass overwrite=True to replace it")
        os.makedirs(images_dir, exist_ok=True)
        gt = self.coco_gt()
        for i, record in enumerate(gt["images"]):
            record["file_name"] = os.path.splitext(record["file_name"])[0] + ".png"
            path = os.path.join(images_dir, record["file_name"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(self.load_image(i).permute(1, 2, 0).numpy()).save(path)
        for a in gt["annotations"]:
            a["segmentation"] = []  # what exporters of box-only data write
        gt["info"] = {"description": repr(self)}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".annotations.", suffix=".tmp")
        try:  # the annotation file appears whole or not at all
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(gt, f)
            os.replace(tmp, ann_path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return images_dir, ann_path

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, samples={len(self)}, "
                f"num_classes={self.num_classes}, category_ids_as_labels={self.category_ids_as_labels})")


# --- reading a COCO annotation file -----------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise DatasetError(f"annotation file not found: {path}", path, "annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable JSON file: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO mapping with 'images', 'annotations', 'categories', "
                           f"got a JSON {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: no {key!r} list (not a COCO annotation file?)")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{path}: 'annotations' must be a list")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> float | None:
    """A finite JSON number as float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _box_fault(box, width: int, height: int) -> str | None:
    """What is wrong with a COCO ``bbox`` in an image of `width` x `height` (None: nothing)."""
    values = [_number(v) for v in box] if isinstance(box, list) else []
    if len(values) != 4 or any(v is None for v in values):
        return f"bbox {box!r} is not four finite numbers [x, y, width, height]"
    x, y, w, h = values
    if w < 0 or h < 0:
        return f"bbox {box} (XYWH) has a negative {'width' if w < 0 else 'height'}"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"bbox {box} (XYWH) lies outside the {width} x {height} (W x H) image"
    return None


class CocoJson(DetectionDataset):
    """Any COCO-format detection file: ``images`` (the folder the ``file_name`` entries are relative to,
    sub-folders allowed) and ``annotations`` (the JSON file).

    Tolerates what exporters (Roboflow, CVAT, Label Studio, ...) write: extra keys anywhere, ``segmentation``
    absent or empty, ``iscrowd`` / ``area`` absent (0 / the box area), a category of id 0 (Roboflow's
    super-category, kept as a class that never occurs), images without annotations (kept: negatives), images
    without ``width`` / ``height`` (read from the file). ``category_ids_as_labels``: labels are the category ids
    themselves (``num_classes`` = largest id + 1), as the released COCO detector (91 classes) was trained;
    default: contiguous labels in the order of the sorted ids.
    """

    def __init__(
        self,
        images: str,
        annotations: str,
        transforms: Callable | None = None,
        *,
        category_ids_as_labels: bool = False,
        strict: bool = True,
    ):
        self.images_dir = os.path.expanduser(str(images))
        super().__init__(self.images_dir, None, transforms, strict=strict)
        self.annotation_file = os.path.expanduser(str(annotations))
        data = _read_json(self.annotation_file)
        if not os.path.isdir(self.images_dir):
            raise DatasetError(f"{type(self).__name__}: image folder not found: {self.images_dir}")
        self._set_categories(self._index_categories(data["categories"]), category_ids_as_labels)
        self._index_annotations(data.get("annotations", []), self._index_images(data["images"]))
        self._finish_indexing(self.annotation_file)

    def _fault(self, what: str) -> None:
        self.problems.append((self.annotation_file, what))

    def _index_categories(self, categories: list) -> dict[int, str]:
        names: dict[int, str] = {}
        for k, cat in enumerate(categories):
            cid = cat.get("id") if isinstance(cat, dict) else None
            if not _is_int(cid) or cid < 0:
                self._fault(f"category #{k}: id {cid!r} is not a non-negative integer")
            elif cid in names:
                self._fault(f"duplicate category id {cid}")
            else:
                names[cid] = str(cat.get("name", cid))
        if not names:
            raise DatasetError(f"{self.annotation_file}: no usable category in 'categories'")
        return names

    def _index_images(self, images: list) -> dict[int, tuple[str, str, int, int]]:
        """image id -> (path, file_name, height, width) of the images that exist."""
        records: dict[int, tuple[str, str, int, int]] = {}
        seen = self._listed_image_ids = set()
        for k, img in enumerate(images):
            iid = img.get("id") if isinstance(img, dict) else None
            name = img.get("file_name") if isinstance(img, dict) else None
            if not _is_int(iid):
                self._fault(f"image #{k}: id {iid!r} is not an integer")
                continue
            if iid in seen:
                self._fault(f"duplicate image id {iid} ({name})")
                continue
            seen.add(iid)
            if not isinstance(name, str) or not name:
                self._fault(f"image id {iid}: no file_name")
                continue
            path = os.path.join(self.images_dir, name.replace("\\", "/"))
            if not os.path.isfile(path):
                self.problems.append((path, f"missing image (image id {iid} in {self.annotation_file})"))
                continue
            height, width = img.get("height"), img.get("width")
            if height is None or width is None:
                try:
                    height, width = image_size(path)
                except DatasetError as e:
                    self.problems.append((path, f"unreadable image (image id {iid}): {e}"))
                    continue
            if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
                self._fault(f"image id {iid} ({name}): width {width!r} and height {height!r} must be positive integers")
                continue
            records[iid] = (path, name, height, width)
        return records

    def _index_annotations(self, annotations: list, records: dict) -> None:
        """Check every annotation (ids and types in one pass, boxes vectorised: COCO train has 860k) and add the
        images in `records` to ``samples`` with their valid annotations."""
        seen: set[int] = set()
        fields, boxes = [], []  # (id, image id, category id, iscrowd, area) and bbox of the annotations kept so far
        for k, ann in enumerate(annotations):
            if type(ann) is not dict:
                self._fault(f"annotation #{k} is not a mapping")
                continue
            aid, iid, cid = ann.get("id"), ann.get("image_id"), ann.get("category_id")
            if type(aid) is not int:
                self._fault(f"annotation #{k}: id {aid!r} is not an integer")
                continue
            if aid in seen:
                self._fault(f"duplicate annotation id {aid}")
                continue
            seen.add(aid)
            if type(iid) is not int or iid not in records:
                if not (type(iid) is int and iid in self._listed_image_ids):  # else: its image's fault is reported
                    self._fault(f"annotation {aid}: unknown image id {iid!r} (not in 'images')")
                continue
            if type(cid) is not int or cid not in self.category_names:
                self._fault(f"annotation {aid} (image {iid}): unknown category id {cid!r} (not in 'categories')")
                continue
            box = ann.get("bbox")
            if type(box) is not list or len(box) != 4 or not all(type(v) is float or type(v) is int for v in box):
                self._fault(f"annotation {aid} (image {iid}, {records[iid][1]}): bbox {box!r} is not four finite "
                            "numbers [x, y, width, height]")
                continue
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1):  # True / False compare equal to 1 / 0
                self._fault(f"annotation {aid} (image {iid}, {records[iid][1]}): iscrowd {crowd!r} must be 0 or 1")
                continue
            area = ann.get("area")
            fields.append((aid, iid, cid, bool(crowd), float(area) if type(area) in (int, float) else math.nan))
            boxes.append(box)

        n = len(fields)
        box = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
        ann_ids, image_ids, cat_ids, crowd, area = (np.asarray(c).reshape(n) for c in zip(*fields)) if n else \
            (np.zeros(0, np.int64),) * 3 + (np.zeros(0, bool), np.zeros(0))
        height = np.asarray([records[i][2] for i in image_ids.tolist()], dtype=np.float64).reshape(n)
        width = np.asarray([records[i][3] for i in image_ids.tolist()], dtype=np.float64).reshape(n)
        x, y, w, h = box.T
        t = BOX_TOLERANCE
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(box).all(1) | (w < 0) | (h < 0) | (x < -t) | (y < -t) | (x + w > width + t) | (y + h > height + t)
            zero = ~bad & ((w == 0) | (h == 0))
        for j in np.flatnonzero(bad | zero).tolist():
            iid = int(image_ids[j])
            where = f"annotation {int(ann_ids[j])} (image {iid}, {records[iid][1]})"
            fault = _box_fault(boxes[j], records[iid][3], records[iid][2])
            if fault is not None:
                self._fault(f"{where}: {fault}")
            else:
                self.warnings.append((self.annotation_file, f"{where}: bbox {boxes[j]} (XYWH) has no area: left out "
                                                            "of the training targets"))
        area = np.where(np.isnan(area), w * h, area)

        keep = np.flatnonzero(~bad)
        order = keep[np.argsort(image_ids[keep], kind="stable")]  # by image, file order within an image
        ann_ids, image_ids, cat_ids, crowd, area, box = (a[order] for a in (ann_ids, image_ids, cat_ids, crowd, area, box))
        starts = np.searchsorted(image_ids, list(records), side="left")
        ends = np.searchsorted(image_ids, list(records), side="right")
        for (iid, (path, name, height_, width_)), s, e in zip(records.items(), starts.tolist(), ends.tolist()):
            self.samples.append(DetectionSample(path, name, iid, height_, width_, ann_ids[s:e], box[s:e], cat_ids[s:e],
                                                crowd[s:e], area[s:e]))


class COCO(CocoJson):
    """The official COCO 2017 layout: ``root/annotations/instances_<split>2017.json`` and ``root/<split>2017/``.
    ``split``: train or val. ``category_ids_as_labels``: see `CocoJson` (True for the released 91-class
    detector; the default trains an 80-class head)."""

    SPLITS = {"train": "train", "training": "train", "train2017": "train", "val": "val", "validation": "val",
              "val2017": "val"}  # fmt: skip

    def __init__(
        self,
        root: str,
        split: str = "train",
        transforms: Callable | None = None,
        *,
        category_ids_as_labels: bool = False,
        strict: bool = True,
    ):
        root = check_root(root, "COCO")
        split = normalize_split(split, self.SPLITS, "COCO")
        annotations = os.path.join(root, "annotations", f"instances_{split}2017.json")
        super().__init__(os.path.join(root, f"{split}2017"), annotations, transforms,
                         category_ids_as_labels=category_ids_as_labels, strict=strict)
        self.root, self.split = root, split
