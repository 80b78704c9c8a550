"""Box-aware transforms for object detection: Plain-DETR's COCO recipe on ``torchvision.transforms.v2``.

Every pipeline is a callable ``(image, target) -> (image, target)``: it takes what a detection dataset returns
(``dinoseg.data.datasets.coco``: image uint8 [3, H, W], ``target`` with ``boxes`` XYXY in pixels, ``labels``,
``image_id``, ``orig_size``, ``size``) and gives

    image      float32 [3, H', W'], normalised (ImageNet mean / std)
    boxes      float32 [N, 4], (cx, cy, w, h): divided by (W', H', W', H') for the plain detector, in pixels of
               the transformed image for the reparameterised one (``reparam=True``, the released detector)
    labels     int64 [N], the boxes that survived the augmentation
    image_id, orig_size (H, W as stored: where the evaluation maps boxes back to)
    size       int64 [2], (H', W') after the transforms (before any batch padding)

Boxes move with the image through tv_tensors.BoundingBoxes (torchvision does the box arithmetic); a crop clamps
them to itself and drops those left with less than a pixel of width or height (``SanitizeBoundingBoxes``), as
Plain-DETR drops empty ones. Random draws use torch's RNG, so DataLoader workers (seeded per worker and epoch)
draw different augmentations, reproducibly. Batch the outputs with ``dinoseg.eval.detection.util.misc.collate_fn``.

Train (Plain-DETR's ``make_coco_transforms("train")``): horizontal flip (p 0.5), then with equal chance either
a resize of the short side to one of ``scales`` (long side at most ``max_size``) or the random resize-crop
branch (short side to one of ``crop_scales``, a random crop of ``crop_min_size``-``crop_max_size`` pixels per
side, then the same multi-scale resize). Eval: the short side to ``size``, the long side at most ``max_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# torchvision is imported by the functions that use it: its import pulls in torch._dynamo (a second or more), which
# loading the task's config (its defaults are here) must not wait for.

# Plain-DETR's COCO recipe.
SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
MAX_SIZE = 1333
CROP_SCALES = (400, 500, 600)
CROP_MIN_SIZE, CROP_MAX_SIZE = 384, 600
EVAL_SIZE = 800


def resized_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(H', W') with the short side `size` (reduced so that the long side stays within `max_size`), the long side
    rounded down: Plain-DETR's rule, so images get exactly its sizes."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def fitted_size(height: int, width: int, size: int, max_size: int | None, canvas: Sequence[int]) -> tuple[int, int]:
    """(H', W') of the eval resize (`resized_size`), scaled down, keeping the aspect ratio, where it does not fit in
    `canvas` (H, W): the size an image takes in a fixed-size detector graph, padded to the canvas."""
    canvas_h, canvas_w = (int(c) for c in canvas)
    h, w = resized_size(height, width, size, max_size)
    if h <= canvas_h and w <= canvas_w:
        return h, w
    if height * canvas_w >= width * canvas_h:  # the height limits
        return canvas_h, max(1, min(canvas_w, int(round(width * canvas_h / height))))
    return max(1, min(canvas_h, int(round(height * canvas_w / width)))), canvas_w


class FitResize:
    """Resize ``(image, target)`` to `fitted_size`: the eval transform's short side `size` and long side at most
    `max_size`, then scaled down to fit in `canvas` (H, W); boxes are scaled with the image."""

    def __init__(self, size: int, max_size: int | None, canvas: Sequence[int]):
        self.size, self.max_size, self.canvas = int(size), max_size, tuple(int(c) for c in canvas)

    def __call__(self, *inputs):
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        height, width = F.get_size(inputs[0])
        return v2.Resize(fitted_size(height, width, self.size, self.max_size, self.canvas), antialias=True)(*inputs)

    def __repr__(self) -> str:
        return f"FitResize(size={self.size}, max_size={self.max_size}, canvas={list(self.canvas)})"


class RandomResize:
    """Resize ``(image, target)`` so that the short side is one of `sizes` (drawn uniformly) and the long side at
    most `max_size` (`resized_size`): Plain-DETR's ``RandomResize``; boxes are scaled with the image."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) <= 0:
            raise ValueError(f"RandomResize needs positive sizes, got {sizes}")
        if max_size is not None and max_size < min(self.sizes):
            raise ValueError(f"max_size={max_size} is below the sizes {self.sizes}")
        self.max_size = max_size

    def __call__(self, *inputs):
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        size = self.sizes[int(torch.randint(len(self.sizes), ()))] if len(self.sizes) > 1 else self.sizes[0]
        height, width = F.get_size(inputs[0])
        return v2.Resize(resized_size(height, width, size, self.max_size), antialias=True)(*inputs)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region whose width and height are drawn uniformly in ``[min_size, max_size]`` (each at most
    the image's side; an image smaller than `min_size` is kept whole on that side) at a random place: Plain-DETR's
    ``RandomSizeCrop``. Takes and returns ``(image, target)``; boxes are cropped and clamped with the image."""

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def _draw(self, side: int) -> int:
        high = min(side, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, ()))

    def __call__(self, *inputs):
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        height, width = F.get_size(inputs[0])
        return v2.RandomCrop((self._draw(height), self._draw(width)))(*inputs)

    def __repr__(self) -> str:
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


def _labels(inputs):
    """The per-box tensors that `SanitizeBoundingBoxes` filters along with the boxes."""
    return inputs[1]["labels"]


def _unit_range(values: Sequence[float], name: str) -> list[float]:
    """Mean / std in [0, 1] units; values given in 0-255 (any above 1, as the official DINOv3 configs store
    them) are divided by 255, as the other tasks' ``Normalize`` does."""
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values, got {values}")
    return [v / 255.0 for v in values] if max(values) > 1.0 else values


class DetectionTransform:
    """Geometric steps (torchvision v2 transforms on ``(tv_tensors.Image, target)``), then float conversion,
    normalisation and the box format the loss takes (module docstring). Accepts a uint8 tensor [3, H, W], a PIL
    image or an RGB array; ``target["boxes"]`` may be a plain [N, 4] XYXY tensor."""

    def __init__(self, steps: Sequence[Callable], *, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, reparam: bool = False):
        from torchvision.transforms import v2

        self.steps = list(steps)
        self.geometry = v2.Compose(self.steps) if self.steps else None
        self.mean, self.std = _unit_range(mean, "mean"), _unit_range(std, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.reparam = bool(reparam)

    def __call__(self, image, target: dict) -> tuple[torch.Tensor, dict]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        if isinstance(image, Image.Image):
            image = F.pil_to_tensor(image.convert("RGB"))
        elif isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        image = tv_tensors.Image(image)
        target = dict(target)
        if not isinstance(target["boxes"], tv_tensors.BoundingBoxes):
            target["boxes"] = tv_tensors.BoundingBoxes(torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
                                                       format="XYXY", canvas_size=tuple(image.shape[-2:]))
        if self.geometry is not None:
            image, target = self.geometry(image, target)
        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        height, width = image.shape[-2:]
        boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        boxes = boxes.as_subclass(torch.Tensor).float()
        if not self.reparam:
            boxes = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
        target["boxes"] = boxes
        target["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64)
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        return image.as_subclass(torch.Tensor), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(s) for s in self.steps)}, reparam={self.reparam})"


def make_detection_train_transforms(
    *,
    scales: Sequence[int] = SCALES,
    max_size: int | None = MAX_SIZE,
    crop_scales: Sequence[int] | None = CROP_SCALES,
    crop_min_size: int = CROP_MIN_SIZE,
    crop_max_size: int = CROP_MAX_SIZE,
    flip_prob: float = 0.5,
    reparam: bool = False,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> DetectionTransform:
    """Plain-DETR's training augmentation (module docstring), its defaults. ``crop_scales=None`` leaves out the
    resize-crop branch (multi-scale resize only); ``reparam``: boxes in pixels (the reparameterised detector)
    instead of fractions of the image size."""
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    from torchvision.transforms import v2

    resize = RandomResize(scales, max_size)
    steps: list[Callable] = [v2.RandomHorizontalFlip(flip_prob)] if flip_prob > 0 else []
    if crop_scales is not None:
        crop = v2.Compose([RandomResize(crop_scales), RandomSizeCrop(crop_min_size, crop_max_size), resize])
        steps.append(v2.RandomChoice([resize, crop]))
    else:
        steps.append(resize)
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(labels_getter=_labels)]
    return DetectionTransform(steps, mean=mean, std=std, reparam=reparam)


def make_detection_eval_transforms(
    *,
    size: int = EVAL_SIZE,
    max_size: int | None = MAX_SIZE,
    reparam: bool = False,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> DetectionTransform:
    """Plain-DETR's evaluation transform: the short side to `size`, the long side at most `max_size`; every box
    is kept (the evaluation reads the ground truth from the dataset, `dinoseg.eval.detection.metrics`)."""
    return DetectionTransform([RandomResize([size], max_size)], mean=mean, std=std, reparam=reparam)
