"""Joint image / label transforms for semantic segmentation.

Every transform is a callable ``(image, label) -> (image, label)`` acting on a ``tv_tensors.Image`` and a
``tv_tensors.Mask`` together, built on ``torchvision.transforms.v2.functional``. Labels are only ever moved
(resized with exact nearest neighbour, cropped, flipped, padded with the ignore index), never interpolated,
so they keep the values they had. dinoseg's datasets return train ids already (see
``dinoseg.data.datasets.base``), so its pipelines never reduce labels; the official ``reduce_zero_label``
argument is there for raw ADE20K-style labels from elsewhere.

Train pipeline (mmseg / DINOv3 order): random short-side resize -> random crop with ``cat_max_ratio`` ->
horizontal flip -> photometric distortion -> normalisation -> pad to the crop size (image 0 = the mean
colour after normalisation, label = ignore). ``make_segmentation_eval_transforms`` is the official evaluation
transform (a list of views: test-time scales and flips); dinoseg's own pipeline uses
``make_single_view_eval_transforms`` (short-side resize of the image only, then normalisation; the scales are
taken at inference). The label stays at its original resolution, as in the official slide evaluation: metrics
are computed at the original label size and predictions are resized to it.
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
from ...data.datasets.base import reduce_zero_label as _reduce_zero_label
from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, rand_bool, rand_uniform, to_pair
from .inference import tta_image_size

Pair = tuple[torch.Tensor, torch.Tensor]
# The official defaults, in the 0-255 range (`Normalize` recognises it).
OFFICIAL_MEAN = tuple(m * 255 for m in IMAGENET_DEFAULT_MEAN)
OFFICIAL_STD = tuple(s * 255 for s in IMAGENET_DEFAULT_STD)
INFERENCE_MODES = ("whole", "slide")


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


def _resize_label(label: torch.Tensor, size: list[int], mode: InterpolationMode) -> tv_tensors.Mask:
    """Nearest neighbour sampled at pixel centres, like the bilinear image resize (and like PIL's NEAREST, which the
    official code resizes with): labels are moved, never blended. Done here because torchvision's mask kernel
    samples corners (a half-pixel shift) before version 0.2x whatever the mode asked."""
    if mode not in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
        raise ValueError(f"label_interpolation must be NEAREST or NEAREST_EXACT (labels are not blended), got {mode}")
    out = torch.nn.functional.interpolate(label[None, None].float(), size=list(size), mode="nearest-exact")
    return tv_tensors.Mask(out[0, 0].to(label.dtype))


def _resize_pair(image, label, size: list[int], resize_label: bool = True,
                 image_interpolation: InterpolationMode = InterpolationMode.BILINEAR,
                 label_interpolation: InterpolationMode = InterpolationMode.NEAREST):
    image = F.resize(image, size, interpolation=image_interpolation, antialias=True)
    if resize_label:
        label = _resize_label(label.as_subclass(torch.Tensor), size, label_interpolation)
    return image, label


def rescaled_size(height: int, width: int, img_size, ratio: float = 1.0) -> list[int]:
    """Output (H, W), the official rule: ``img_size`` int: the short side becomes ``int(img_size * ratio)``, the
    long side keeps the aspect ratio (rounded to nearest); ``(H, W)``: that size exactly (no ratio)."""
    if not isinstance(img_size, int):
        return [int(s) for s in img_size]
    side = max(1, int(img_size * ratio))
    if height > width:
        return [max(1, int(side * height / width + 0.5)), side]
    return [side, max(1, int(side * width / height + 0.5))]


class RandomShortSideResize:
    """Resize image and label so the short side is ``int(img_size * U(ratio_range))`` (aspect ratio kept), or to
    ``img_size`` = (H, W) exactly (then without a random ratio, as officially)."""

    def __init__(self, img_size, ratio_range: Sequence[float] | None = None, resize_label: bool = True,
                 image_interpolation: InterpolationMode = InterpolationMode.BILINEAR,
                 label_interpolation: InterpolationMode = InterpolationMode.NEAREST):
        if not isinstance(img_size, int):
            img_size = tuple(int(s) for s in img_size)
            if len(img_size) != 2:
                raise ValueError(f"img_size must be an int (short side) or (height, width), got {img_size}")
        if ratio_range is not None:
            ratio_range = tuple(float(r) for r in ratio_range)
            if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
                raise ValueError(f"random_img_size_ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.img_size, self.ratio_range, self.resize_label = img_size, ratio_range, resize_label
        self.image_interpolation, self.label_interpolation = image_interpolation, label_interpolation

    def __call__(self, image, label):
        ratio = 1.0 if self.ratio_range is None or not isinstance(self.img_size, int) else rand_uniform(*self.ratio_range)
        size = rescaled_size(*image.shape[-2:], self.img_size, ratio)
        if list(image.shape[-2:]) == size:
            return image, label
        return _resize_pair(image, label, size, self.resize_label, self.image_interpolation, self.label_interpolation)


class ReduceZeroLabel:
    """Label 0 -> ``ignore_index``, k -> k - 1 (raw ADE20K-style labels to train ids)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = ignore_index

    def __call__(self, image, label):
        return image, tv_tensors.Mask(_reduce_zero_label(label.as_subclass(torch.Tensor), self.ignore_index))


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
    """The official photometric distortion on a float image in [0, 1]; each step applied with probability 1/2:
    brightness (additive, ``brightness_delta`` / 255), contrast (multiplicative; before or after the colour steps,
    at random), saturation, hue (a shift drawn from ``hue_range``, in turns of the colour circle: the official
    (-0.5, 0.5) reaches any hue; mmseg's 18 / 180 is (-0.1, 0.1)). The label is untouched. Values are not rounded
    to uint8 between the steps (the official code works on uint8 arrays)."""

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_range: Sequence[float] = (-0.5, 0.5),
    ):
        hue_range = tuple(float(h) for h in hue_range)
        if len(hue_range) != 2 or not -0.5 <= hue_range[0] <= hue_range[1] <= 0.5:
            raise ValueError(f"hue_range must be (low, high) with -0.5 <= low <= high <= 0.5, got {hue_range}")
        self.brightness = float(brightness_delta) / 255.0
        self.contrast = tuple(float(c) for c in contrast_range)
        self.saturation = tuple(float(s) for s in saturation_range)
        self.hue = hue_range

    def __call__(self, image, label):
        if not image.is_floating_point():
            raise TypeError("PhotoMetricDistortion expects a float image in [0, 1]")
        if self.brightness > 0 and rand_bool(0.5):
            image = (image + rand_uniform(-self.brightness, self.brightness)).clamp_(0.0, 1.0)
        contrast_first = rand_bool(0.5)
        if contrast_first and rand_bool(0.5):
            image = (image * rand_uniform(*self.contrast)).clamp_(0.0, 1.0)
        if rand_bool(0.5):
            image = F.adjust_saturation(image, rand_uniform(*self.saturation))
        if self.hue != (0.0, 0.0) and rand_bool(0.5):
            image = F.adjust_hue(image, rand_uniform(*self.hue))
        if not contrast_first and rand_bool(0.5):
            image = (image * rand_uniform(*self.contrast)).clamp_(0.0, 1.0)
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
    *,
    img_size=None,
    image_interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    label_interpolation: InterpolationMode = InterpolationMode.NEAREST,
    random_img_size_ratio_range: Sequence[float] | None = None,
    crop_size=None,
    flip_prob: float = 0.0,
    reduce_zero_label: bool = False,
    mean: Sequence[float] = OFFICIAL_MEAN,
    std: Sequence[float] = OFFICIAL_STD,
    cat_max_ratio: float = 0.75,
    photometric: bool | dict = True,
    ignore_index: int = IGNORE_INDEX,
) -> SegmentationTransform:
    """Training augmentation (official arguments and defaults, then dinoseg's). ``img_size``: short side before
    the random ratio, or (H, W) exactly (None = keep the size); ``crop_size``: int or (H, W), None = no crop / pad;
    ``reduce_zero_label``: map raw labels (0 = ignored) to train ids; ``cat_max_ratio``: see `RandomCropCatMax`;
    ``photometric``: True (the official `PhotoMetricDistortion`), False, or its keyword arguments."""
    steps: list[Callable] = []
    if img_size is not None:
        steps.append(RandomShortSideResize(img_size, random_img_size_ratio_range, True, image_interpolation,
                                           label_interpolation))
    elif random_img_size_ratio_range is not None:
        raise ValueError("random_img_size_ratio_range needs img_size")
    if reduce_zero_label:
        steps.append(ReduceZeroLabel(ignore_index))
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


def make_single_view_eval_transforms(
    img_size=None,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> SegmentationTransform:
    """dinoseg's evaluation transform: resize the IMAGE so its short side is ``img_size`` (None = keep) and
    normalise it; returns one image tensor. The label is returned unchanged, at its original resolution:
    predictions are resized to it for the metrics (test-time scales are taken at inference)."""
    steps: list[Callable] = []
    if img_size is not None:
        steps.append(RandomShortSideResize(img_size, None, resize_label=False))
    steps += [ToFloat(), Normalize(mean, std)]
    return SegmentationTransform(steps)


class EvalViews:
    """The official evaluation transform: ``(image, label) -> (views, label)`` with ``views`` a list of normalised
    image tensors (see `make_segmentation_eval_transforms`)."""

    def __init__(self, img_size, inference_mode: str, image_interpolation: InterpolationMode,
                 label_interpolation: InterpolationMode, use_tta: bool, tta_ratios: Sequence[float],
                 mean: Sequence[float], std: Sequence[float]):
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"unknown inference_mode {inference_mode!r}; expected one of {list(INFERENCE_MODES)}")
        if img_size is not None and not isinstance(img_size, int):
            img_size = tuple(int(s) for s in img_size)
        self.img_size, self.inference_mode, self.use_tta = img_size, inference_mode, use_tta
        self.tta_ratios = tuple(float(r) for r in tta_ratios)
        self.image_interpolation, self.label_interpolation = image_interpolation, label_interpolation
        self.to_float, self.normalize = ToFloat(), Normalize(mean, std)

    def _resize(self, image, label, size, resize_label: bool):
        return _resize_pair(image, label, list(size), resize_label, self.image_interpolation, self.label_interpolation)

    def __call__(self, image, label) -> tuple[list[torch.Tensor], torch.Tensor]:
        image, label = to_image_and_mask(image, label)
        height, width = image.shape[-2:]
        if self.img_size is None:
            views = [image]
        elif not isinstance(self.img_size, int):  # a fixed size: image and label, whatever the mode
            image, label = self._resize(image, label, self.img_size, True)
            views = [image]
        elif self.use_tta:  # every scale from the original image; the label keeps its size
            views = [self._resize(image, label, tta_image_size(height, width, self.img_size, r), False)[0]
                     for r in self.tta_ratios]
        else:
            image, label = self._resize(image, label, rescaled_size(height, width, self.img_size),
                                        self.inference_mode == "whole")
            views = [image]
        if self.use_tta:
            views += [F.horizontal_flip(v) for v in views]
        views = [self.normalize(*self.to_float(v, label))[0].as_subclass(torch.Tensor) for v in views]
        return views, label.as_subclass(torch.Tensor).long()


def make_segmentation_eval_transforms(
    *,
    img_size=None,
    inference_mode: str = "whole",
    image_interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    label_interpolation: InterpolationMode = InterpolationMode.NEAREST,
    use_tta: bool = False,
    tta_ratios: Sequence[float] = (1.0,),
    mean: Sequence[float] = OFFICIAL_MEAN,
    std: Sequence[float] = OFFICIAL_STD,
) -> EvalViews:
    """The official evaluation transform: ``(image, label) -> (views, label)``, ``views`` a list of normalised
    float images. ``img_size`` int: the short side (``use_tta``: one view per ratio of ``tta_ratios``, the official
    TTA size rule `tta_image_size`, from the original image), (H, W): that size; ``inference_mode`` "whole" also
    resizes the label (not with TTA), "slide" keeps it at its original size. ``use_tta`` appends the horizontal
    flip of every view. For `evaluate_segmentation_model`'s official form."""
    return EvalViews(img_size, inference_mode, image_interpolation, label_interpolation, use_tta, tta_ratios, mean, std)
