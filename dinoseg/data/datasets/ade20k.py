"""ADE20K (SceneParsing, 150 classes) in the official ``ADEChallengeData2016`` layout.

    ADEChallengeData2016/
      images/{training,validation}/ADE_*.jpg
      annotations/{training,validation}/ADE_*.png     # 8-bit, 0 = "other" (unlabelled), 1..150 = classes
      ADE20K_object150_{train,val}.txt                 # optional split lists (official dinov3 layout)

Annotation value 0 is not a class: ``reduce_zero_label`` maps 0 -> 255 (ignored) and k -> k-1, here, once.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..io import IMAGE_EXTENSIONS, DatasetError, read_list_file
from .base import Sample, SegmentationDataset, check_root, hex_palette, normalize_split

ADE20K_CLASS_NAMES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip
_ADE20K_PALETTE_HEX = (
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 "
    "96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff "
    "ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff "
    "e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff "
    "8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff "
    "0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 "
    "0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014 "
    "ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52 000aff 0070ff 3300ff 00c2ff 007aff "
    "00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff "
    "ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 "
    "ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 00ccff 1400ff "
    "ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8 005cff "
    "b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff"
)
ADE20K_PALETTE = hex_palette(_ADE20K_PALETTE_HEX)

_SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val"}
_SPLIT_DIRS = {"train": "training", "val": "validation"}


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing. ``root`` is the ``ADEChallengeData2016`` folder (or the folder holding it).

    The split list ``ADE20K_object150_{split}.txt`` is used when present (``use_split_file="auto"``), else
    every image in ``images/{training,validation}``. List lines may be ``training/ADE_train_00000001.jpg``
    (official), a path under ``images/``, a bare file name or a stem.
    """

    num_classes = 150

    def __init__(
        self,
        root: str,
        split: str = "train",
        transforms: Callable | None = None,
        *,
        use_split_file: bool | str = "auto",
        reduce_zero_label: bool = True,
        strict: bool = True,
    ):
        root = check_root(root, "ADE20K")
        if not os.path.isdir(os.path.join(root, "images")) and os.path.isdir(
            os.path.join(root, "ADEChallengeData2016", "images")
        ):
            root = os.path.join(root, "ADEChallengeData2016")
        split = normalize_split(split, _SPLITS, "ADE20K")
        super().__init__(root, split, transforms, strict)
        self.class_names, self.palette = list(ADE20K_CLASS_NAMES), list(ADE20K_PALETTE)
        # Turning it off is only meant for annotations already converted to 0-based train ids (255 = ignore).
        self.reduce_zero_label = reduce_zero_label
        subdir = _SPLIT_DIRS[split]
        image_dir = os.path.join(root, "images", subdir)
        list_file = os.path.join(root, f"ADE20K_object150_{split}.txt")
        if use_split_file is True or (use_split_file == "auto" and os.path.isfile(list_file)):
            for entry in sorted(read_list_file(list_file)):
                self._add(self._resolve_listed(entry, subdir), subdir, listed_in=list_file)
        elif use_split_file in (False, "auto"):
            if not os.path.isdir(image_dir):
                self.problems.append((image_dir, "empty split: image folder not found"))
            else:
                for name in sorted(os.listdir(image_dir)):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        self._add(os.path.join(image_dir, name), subdir)
        else:
            raise DatasetError(f"ADE20K: use_split_file must be True, False or 'auto', got {use_split_file!r}")
        self._finish_indexing(image_dir)

    def _resolve_listed(self, entry: str, subdir: str) -> str:
        entry = entry.replace("\\", "/").lstrip("./")
        base = os.path.basename(entry)
        if not os.path.splitext(base)[1]:
            base, entry = base + ".jpg", entry + ".jpg"
        candidates = [
            os.path.join(self.root, "images", entry),
            os.path.join(self.root, entry),
            os.path.join(self.root, "images", subdir, base),
        ]
        return next((c for c in candidates if os.path.isfile(c)), candidates[-1])

    def _add(self, image: str, subdir: str, listed_in: str | None = None) -> None:
        if not os.path.isfile(image):
            where = f" (listed in {listed_in})" if listed_in else ""
            self.problems.append((image, f"missing image{where}"))
            return
        stem = os.path.splitext(os.path.basename(image))[0]
        mask = os.path.join(self.root, "annotations", subdir, stem + ".png")
        if not os.path.isfile(mask):
            self.problems.append((image, f"missing mask: expected {mask}"))
            mask = None
        self.samples.append(Sample(image, mask, stem))
