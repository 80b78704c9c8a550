"""Joint image / label transforms for semantic segmentation.

Every transform is a callable ``(image, label) -> (image, label)`` acting on a ``tv_tensors.Image`` and a
``tv_tensors.Mask`` together, built on ``torchvision.transforms.v2.functional``. Labels are only ever moved
(resized with exact nearest neighbour, cropped, flipped, padded with the ignore index), never interpolated,
so they keep the values they had. ``reduce_zero_label`` is NOT a transform: datasets return train ids
already (see ``dinoseg.data.datasets.base``).

Train pipeline (mmseg / DINOv3 order): random short-side resize -> random crop with ``cat_max_ratio`` ->
horizontal flip -> photometric distortion -> normalisation -> pad to the crop size (image 0 = the mean
colour after normalisation, label = ignore). Eval pipeline: short-side resize of the image only, then
normalisation; the label stays at its original resolution, as in the official evaluation: metrics are
computed at the original label size and predictions are resized to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ...data.datasets.base import IGNORE_INDEX
from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, rand_bool, rand_uniform, to_pair

Pair = tuple[torch.Tensor, torch.Tensor]


def to_image_and_mask(image, label) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Accept tensors (image ``[3, H, W]`` uint8, label ``[H, W]`` or ``[1, H, W]``), PIL images or arrays."""
    if isinstance(image, Image.Image):
        image = F.pil_to_tensor(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    if isinstance(label, Image.Image):
        label = np.array(label)
    if isinstance(label, np.ndarray):
        label = torch.from_numpy(np.ascontiguousarray(label))
    if label.ndim == 3 and label.shape[0] == 1:
        label = label[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    if label.ndim != 2:
        raise ValueError(f"expected a label map [H, W], got shape {tuple(label.shape)}")
    if image.shape[-2:] != label.shape:
        raise ValueError(f"image {tuple(image.shape[-2:])} and label {tuple(label.shape)} sizes differ")
    if label.is_floating_point():
        raise ValueError(f"label must be an integer tensor, got {label.dtype}")
    return tv_tensors.Image(image), tv_tensors.Mask(label.long())


def _resize_pair(image, label, size: list[int], resize_label: bool = True):
    image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    if resize_label:
        # NEAREST_EXACT samples at pixel centres like bilinear (align_corners=False), so label and image stay
        # aligned; plain NEAREST shifts the label by up to half a pixel.
        label = F.resize(label, size, interpolation=InterpolationMode.NEAREST_EXACT)
    return image, label


def rescaled_size(height: int, width: int, img_size, ratio: float = 1.0) -> list[int]:
    """Output (H, W) keeping the aspect ratio. ``img_size`` int: the short side becomes ``img_size * ratio``;
    ``(long, short)``: the largest size fitting in ``(long * ratio, short * ratio)`` (mmseg ``keep_ratio``)."""
    if isinstance(img_size, int):
        scale = img_size * ratio / min(height, width)
    else:
        long_side, short_side = (float(s) * ratio for s in img_size)
        scale = min(long_side / max(height, width), short_side / min(height, width))
    return [max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))]


class RandomShortSideResize:
    """Resize image and label so the short side is ``img_size * U(ratio_range)`` (aspect ratio kept)."""

    def __init__(self, img_size, ratio_range: Sequence[float] | None = None, resize_label: bool = True):
        if not isinstance(img_size, int):
            img_size = tuple(int(s) for s in img_size)
            if len(img_size) != 2:
                raise ValueError(f"img_size must be an int (short side) or (long, short), got {img_size}")
        if ratio_range is not None:
            ratio_range = tuple(float(r) for r in ratio_range)
            if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
                raise ValueError(f"random_img_size_ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.img_size, self.ratio_range, self.resize_label = img_size, ratio_range, resize_label

    def __call__(self, image, label):
        ratio = 1.0 if self.ratio_range is None else rand_uniform(*self.ratio_range)
        size = rescaled_size(*image.shape[-2:], self.img_size, ratio)
        if list(image.shape[-2:]) == size:
            return image, label
        return _resize_pair(image, label, size, self.resize_label)


class RandomCropCatMax:
    """Random crop of ``crop_size`` (smaller images are cropped to their size and padded later). Re-draws the
    crop up to ``max_tries`` times while one class covers ``>= cat_max_ratio`` of the labelled pixels, so that
    crops are not all sky or wall (mmseg's ``cat_max_ratio``)."""

    def __init__(self, crop_size, cat_max_ratio: float = 0.75, max_tries: int = 10, ignore_index: int = IGNORE_INDEX):
        self.crop_size = to_pair(crop_size, "crop_size")
        self.cat_max_ratio, self.max_tries, self.ignore_index = float(cat_max_ratio), int(max_tries), ignore_index

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.crop_size[0], height), min(self.crop_size[1], width)
        top = int(torch.randint(0, height - ch + 1, ()).item())
        left = int(torch.randint(0, width - cw + 1, ()).item())
        return top, left, ch, cw

    def _balanced(self, label: torch.Tensor, box) -> bool:
        top, left, ch, cw = box
        crop = label[top : top + ch, left : left + cw]
        values = crop[(crop != self.ignore_index) & (crop >= 0)]
        counts = torch.bincount(values.flatten())
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def __call__(self, image, label):
        height, width = image.shape[-2:]
        box = self._draw(height, width)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries - 1):
                if self._balanced(label, box):
                    break
                box = self._draw(height, width)
        return F.crop(image, *box), F.crop(label, *box)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, label):
        if rand_bool(self.p):
            return F.horizontal_flip(image), F.horizontal_flip(label)
        return image, label


class PhotoMetricDistortion:
    """mmseg's photometric distortion on a float image in [0, 1]; each step applied with probability 1/2:
    brightness (additive, ``brightness_delta`` / 255), contrast (before or after the colour steps, at random),
    saturation, hue (shift of ``hue_delta`` / 180 of the colour circle: 18 -> +-36 degrees, not the
    full-circle +-0.5 of the official DINOv3 code). The label is untouched."""

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: float = 18,
    ):
        if not 0 <= hue_delta <= 90:
            raise ValueError(f"hue_delta must be in [0, 90] (degrees / 2, as OpenCV), got {hue_delta}")
        self.brightness = float(brightness_delta) / 255.0
        self.contrast = tuple(float(c) for c in contrast_range)
        self.saturation = tuple(float(s) for s in saturation_range)
        self.hue = float(hue_delta) / 180.0

    def __call__(self, image, label):
        if not image.is_floating_point():
            raise TypeError("PhotoMetricDistortion expects a float image in [0, 1]")
        if self.brightness > 0 and rand_bool(0.5):
            image = (image + rand_uniform(-self.brightness, self.brightness)).clamp_(0.0, 1.0)
        contrast_first = rand_bool(0.5)
        if contrast_first and rand_bool(0.5):
            image = F.adjust_contrast(image, rand_uniform(*self.contrast))
        if rand_bool(0.5):
            image = F.adjust_saturation(image, rand_uniform(*self.saturation))
        if self.hue > 0 and rand_bool(0.5):
            image = F.adjust_hue(image, rand_uniform(-self.hue, self.hue))
        if not contrast_first and rand_bool(0.5):
            image = F.adjust_contrast(image, rand_uniform(*self.contrast))
        return image, label


class ToFloat:
    """uint8 [0, 255] -> float32 [0, 1]."""

    def __call__(self, image, label):
        return F.to_dtype(image, torch.float32, scale=True), label


class Normalize:
    """``(x - mean) / std`` on a [0, 1] image. Means / stds given in the 0-255 range (the official DINOv3
    config stores ``IMAGENET_DEFAULT_MEAN * 255``) are recognised (any value > 1) and divided by 255."""

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got mean={mean}, std={std}")
        if max(mean) > 1.0 or max(std) > 1.0:
            mean, std = [m / 255.0 for m in mean], [s / 255.0 for s in std]
        self.mean, self.std = mean, std

    def __call__(self, image, label):
        return F.normalize(image, self.mean, self.std), label


class PadToSize:
    """Pad bottom / right up to ``size`` (no-op when already as large): image with ``image_value``, label with
    ``ignore_index`` so the padding never counts in the loss."""

    def __init__(self, size, image_value: float = 0.0, ignore_index: int = IGNORE_INDEX):
        self.size = to_pair(size, "crop_size")
        self.image_value, self.ignore_index = image_value, ignore_index

    def __call__(self, image, label):
        pad_h, pad_w = max(self.size[0] - image.shape[-2], 0), max(self.size[1] - image.shape[-1], 0)
        if pad_h == 0 and pad_w == 0:
            return image, label
        padding = [0, 0, pad_w, pad_h]  # left, top, right, bottom
        return F.pad(image, padding, fill=self.image_value), F.pad(label, padding, fill=self.ignore_index)


class SegmentationTransform:
    """A sequence of joint transforms; takes (image uint8 [3, H, W], label [H, W]) and returns plain tensors
    (image float32 [3, H', W'], label int64)."""

    def __init__(self, transforms: Sequence[Callable[..., Pair]]):
        self.transforms = list(transforms)

    def __call__(self, image, label) -> Pair:
        image, label = to_image_and_mask(image, label)
        for t in self.transforms:
            image, label = t(image, label)
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(t).__name__ for t in self.transforms)})"


def make_segmentation_train_transforms(
    img_size=512,
    random_img_size_ratio_range: Sequence[float] | None = (0.5, 2.0),
    crop_size=512,
    flip_prob: float = 0.5,
    cat_max_ratio: float = 0.75,
    photometric: bool | dict = True,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ignore_index: int = IGNORE_INDEX,
) -> SegmentationTransform:
    """Training augmentation. ``img_size``: short side before jitter (None = keep the size); ``crop_size``:
    int or (H, W), None = no crop / pad; ``photometric``: True, False or ``PhotoMetricDistortion`` kwargs."""
    steps: list[Callable] = []
    if img_size is not None:
        steps.append(RandomShortSideResize(img_size, random_img_size_ratio_range))
    elif random_img_size_ratio_range is not None:
        raise ValueError("random_img_size_ratio_range needs img_size")
    if crop_size is not None:
        steps.append(RandomCropCatMax(crop_size, cat_max_ratio, ignore_index=ignore_index))
    if flip_prob > 0:
        steps.append(RandomHorizontalFlip(flip_prob))
    steps.append(ToFloat())
    if photometric:
        steps.append(PhotoMetricDistortion(**(photometric if isinstance(photometric, dict) else {})))
    steps.append(Normalize(mean, std))
    if crop_size is not None:
        steps.append(PadToSize(crop_size, image_value=0.0, ignore_index=ignore_index))
    return SegmentationTransform(steps)


def make_segmentation_eval_transforms(
    img_size=None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> SegmentationTransform:
    """Evaluation: resize the IMAGE so its short side is ``img_size`` (None = keep) and normalise it. The label
    is returned unchanged, at its original resolution: predictions are resized to it for the metrics."""
    steps: list[Callable] = []
    if img_size is not None:
        steps.append(RandomShortSideResize(img_size, None, resize_label=False))
    steps += [ToFloat(), Normalize(mean, std)]
    return SegmentationTransform(steps)
