"""Joint image / depth transforms (official `dinov3.eval.depth.transforms`).

Every step is a callable ``(image, depth) -> (image, depth)`` on an image float32 [3, H, W] in [0, 1] (then
normalised) and a depth float32 [1, H, W] (stored units, then metres after `NormalizeDepth`; 0 = missing).
Pipelines accept PIL images (RGB, and ``I;16`` / ``I`` / ``F`` depth), numpy arrays or tensors (image uint8
[3, H, W], depth [H, W] or [1, H, W]). Depth is only ever moved (nearest-neighbour resize and rotation, crops,
flips, padding with 0), never interpolated, so it keeps its measured values and its holes.

Random draws use torch's RNG, so DataLoader workers (seeded per worker and epoch) draw different
augmentations, reproducibly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, rand_bool, rand_uniform

Pair = tuple[torch.Tensor, torch.Tensor]


class _FixedCropType(Enum):
    NYU = "NYU"  # the NYU-v2 valid region, box (43, 45, 608, 472) of a 640 x 480 image, scaled to the image size
    FULL = "FULL"
    KITTI_KB = "KITTI_KB"  # the KITTI benchmark crop: bottom 352 rows, centred 1216 columns


def _as_image(image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image array [H, W, 3], got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    return image.float() / 255 if image.dtype == torch.uint8 else image.float()


def _as_depth(depth) -> torch.Tensor:
    if isinstance(depth, Image.Image):
        if depth.mode not in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
            raise ValueError(f"depth image has mode {depth.mode!r}; expected a single-channel (16-bit) image")
        depth = np.asarray(depth)
    if isinstance(depth, np.ndarray):
        depth = torch.from_numpy(np.asarray(depth, dtype=np.float32))
    if depth.ndim == 2:
        depth = depth[None]
    if depth.ndim != 3 or depth.shape[0] != 1:
        raise ValueError(f"expected a depth map [H, W] or [1, H, W], got shape {tuple(depth.shape)}")
    return depth.float()


class ToRGBDTensorPair:
    """(PIL / array / tensor image, depth) -> (float32 [3, H, W] in [0, 1], float32 [1, H, W])."""

    def __call__(self, image, depth) -> Pair:
        image, depth = _as_image(image), _as_depth(depth)
        if image.shape[-2:] != depth.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape[-2:])} and depth {tuple(depth.shape[-2:])} sizes differ")
        return image, depth


class FixedCrop:
    """A fixed crop of image and depth (`_FixedCropType` or its name)."""

    def __init__(self, crop_type: _FixedCropType | str):
        try:
            self.crop_type = _FixedCropType(crop_type.upper()) if isinstance(crop_type, str) else _FixedCropType(crop_type)
        except ValueError:
            raise ValueError(f"unknown fixed_crop {crop_type!r}; expected one of {[m.value for m in _FixedCropType]}") from None

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop for an image of that size."""
        if self.crop_type == _FixedCropType.NYU:
            x1, y1, x2, y2 = (int(43 / 640 * width), int(45 / 480 * height), int(608 / 640 * width), int(472 / 480 * height))
            return y1, x1, y2 - y1, x2 - x1
        if self.crop_type == _FixedCropType.KITTI_KB:
            if height < 352 or width < 1216:
                raise ValueError(f"KITTI_KB crop needs an image of at least 352 x 1216, got {height} x {width}")
            return height - 352, (width - 1216) // 2, 352, 1216
        return 0, 0, height, width

    def __call__(self, image, depth) -> Pair:
        box = self.box(*image.shape[-2:])
        return F.crop(image, *box), F.crop(depth, *box)

    def __repr__(self) -> str:
        return f"FixedCrop({self.crop_type.value})"


class ResizeV2:
    """Resize the image (``image_interpolation``) and, with `resize_label`, the depth (nearest neighbour).
    `size`: an int (the shorter side, aspect ratio kept) or (H, W)."""

    def __init__(self, size, image_interpolation=InterpolationMode.BILINEAR, resize_label: bool = False):
        self.size = [int(size)] if isinstance(size, int) else [int(s) for s in size]
        if len(self.size) not in (1, 2) or min(self.size) < 1:
            raise ValueError(f"img_size must be a positive int or (height, width), got {size}")
        self.image_interpolation = InterpolationMode(image_interpolation)
        self.resize_label = resize_label

    def __call__(self, image, depth) -> Pair:
        image = F.resize(image, self.size, interpolation=self.image_interpolation, antialias=True)
        if self.resize_label:
            # NEAREST_EXACT samples at pixel centres, as bilinear does: depth stays aligned with the image.
            depth = F.resize(depth, list(image.shape[-2:]), interpolation=InterpolationMode.NEAREST_EXACT)
        return image, depth

    def __repr__(self) -> str:
        return f"ResizeV2(size={self.size}, resize_label={self.resize_label})"


class NormalizeDepth:
    """Stored depth units -> metres (NYU PNGs: 1000 units per metre, KITTI: 256)."""

    def __init__(self, normalization_factor: float):
        if not normalization_factor > 1e-6:
            raise ValueError(f"depth normalization factor must be > 1e-6, got {normalization_factor}")
        self.factor = float(normalization_factor)

    def __call__(self, image, depth) -> Pair:
        return image, depth / self.factor

    def __repr__(self) -> str:
        return f"NormalizeDepth(normalization_factor={self.factor})"


class Normalize:
    """``(image - mean) / std``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got mean={mean}, std={std}")

    def __call__(self, image, depth) -> Pair:
        return F.normalize(image, self.mean, self.std), depth


class RandomRotation:
    """With probability `p`, rotate by an angle drawn in [-degrees, degrees] about the centre: the image with
    `interpolation`, the depth with nearest neighbour; uncovered corners become 0 (depth: missing)."""

    def __init__(self, degrees: float, p: float = 0.5, interpolation=InterpolationMode.BILINEAR):
        self.degrees, self.p, self.interpolation = float(degrees), float(p), InterpolationMode(interpolation)

    def __call__(self, image, depth) -> Pair:
        if self.degrees <= 0 or not rand_bool(self.p):
            return image, depth
        angle = rand_uniform(-self.degrees, self.degrees)
        image = F.rotate(image, angle, interpolation=self.interpolation, fill=0.0)
        return image, F.rotate(depth, angle, interpolation=InterpolationMode.NEAREST, fill=0.0)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, depth) -> Pair:
        if rand_bool(self.p):
            return F.horizontal_flip(image), F.horizontal_flip(depth)
        return image, depth


class RandomCrop:
    """Random (H, W) crop; an image smaller than that is cropped to its size and padded at the bottom / right
    (image 0, depth 0 = missing), so every sample of a batch has the crop size."""

    def __init__(self, size):
        self.size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"random_crop_size must be a positive int or (height, width), got {size}")

    def __call__(self, image, depth) -> Pair:
        height, width = image.shape[-2:]
        ch, cw = min(self.size[0], height), min(self.size[1], width)
        top = int(torch.randint(0, height - ch + 1, ()).item())
        left = int(torch.randint(0, width - cw + 1, ()).item())
        image, depth = F.crop(image, top, left, ch, cw), F.crop(depth, top, left, ch, cw)
        if (ch, cw) != self.size:
            padding = [0, 0, self.size[1] - cw, self.size[0] - ch]
            image, depth = F.pad(image, padding, fill=0.0), F.pad(depth, padding, fill=0.0)
        return image, depth


class ColorAug:
    """With probability `prob`, on a [0, 1] image: ``clip((255 x)^gamma * brightness * colour, 0, 255) / 255``
    with gamma, brightness and a per-channel colour factor drawn uniformly in their ranges."""

    def __init__(self, prob: float = 0.5, gamma_range=(0.9, 1.1), brightness_range=(0.9, 1.1), color_range=(0.9, 1.1)):
        if not 0 <= prob <= 1:
            raise ValueError(f"ColorAug: prob must be in [0, 1], got {prob}")
        self.prob = float(prob)
        self.gamma_range, self.brightness_range, self.color_range = (
            tuple(sorted(float(v) for v in r)) for r in (gamma_range, brightness_range, color_range)
        )

    def __call__(self, image, depth) -> Pair:
        if not rand_bool(self.prob):
            return image, depth
        gamma = rand_uniform(*self.gamma_range)
        brightness = rand_uniform(*self.brightness_range)
        low, high = self.color_range
        colors = low + (high - low) * torch.rand(3, 1, 1)
        image = ((image * 255) ** gamma * brightness * colors).clamp(0, 255) / 255
        return image, depth


class LeftRightFlipAug:
    """Flip test-time augmentation: ``(image, depth) -> ([image, flipped image], [depth, flipped depth])``
    (only the originals when `flip` is False); `inverse` averages a batch of predictions [originals; flipped]
    with the un-flipped predictions of the flipped half."""

    def __init__(self, flip: bool = False):
        self._flip = flip

    def __call__(self, image, label=None):
        images, labels = [image], [label]
        if self._flip:
            images.append(F.horizontal_flip(image))
            labels.append(F.horizontal_flip(label) if label is not None else None)
        return images, labels

    def inverse(self, stacked_left_right_pair: torch.Tensor) -> torch.Tensor:
        if not self._flip:
            return stacked_left_right_pair
        n = stacked_left_right_pair.shape[0] // 2
        if 2 * n != stacked_left_right_pair.shape[0]:
            raise ValueError(f"flip TTA: a batch of originals and flipped copies has an even size, got {2 * n + 1}")
        return (stacked_left_right_pair[:n] + F.horizontal_flip(stacked_left_right_pair[n:])) / 2


class DepthTransform:
    """A sequence of joint steps after the conversion to tensors (`ToRGBDTensorPair`)."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, depth):
        image, depth = ToRGBDTensorPair()(image, depth)
        for t in self.transforms:
            image, depth = t(image, depth)
        return image, depth

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(t) for t in self.transforms)})"


def make_depth_train_transforms(
    *,
    normalization_constant: float = 1.0,
    rotation_angle: float = 2.5,
    interpolation=InterpolationMode.BILINEAR,
    img_size: int | tuple[int, int] | None = None,
    random_crop_size: tuple[int, int] | None = (352, 704),
    fixed_crop: str = "FULL",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    brightness_range: tuple[float, float] = (0.9, 1.1),
) -> DepthTransform:
    """Official training augmentation, in its order: fixed crop (e.g. NYU's valid region), resize of image and
    depth (`img_size`), depth to metres, rotation in +-`rotation_angle` degrees (probability 1/2), horizontal
    flip (1/2), random crop, colour augmentation (gamma, brightness, colour; probability 1/2), normalisation."""
    steps: list[Callable] = [FixedCrop(fixed_crop)]
    if img_size is not None:
        steps.append(ResizeV2(img_size, image_interpolation=interpolation, resize_label=True))
    steps += [
        NormalizeDepth(normalization_constant),
        RandomRotation(rotation_angle, p=0.5, interpolation=interpolation),
        RandomHorizontalFlip(0.5),
    ]
    if random_crop_size is not None:
        steps.append(RandomCrop(random_crop_size))
    steps += [ColorAug(prob=0.5, brightness_range=brightness_range), Normalize(mean, std)]
    return DepthTransform(steps)


def make_depth_eval_transforms(
    *,
    normalization_constant: float = 1.0,
    img_size: int | tuple[int, int] | None = None,
    image_interpolation=InterpolationMode.BILINEAR,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    fixed_crop: str = "FULL",
    tta: bool = False,
) -> DepthTransform:
    """Evaluation: fixed crop, resize of the IMAGE only (the depth keeps its resolution: predictions are
    resized to it), normalisation, depth to metres. Returns ``([image(, flipped image)], [depth(, flipped)])``."""
    steps: list[Callable] = [FixedCrop(fixed_crop)]
    if img_size:
        steps.append(ResizeV2(img_size, image_interpolation=image_interpolation, resize_label=False))
    steps += [Normalize(mean, std), NormalizeDepth(normalization_constant), LeftRightFlipAug(flip=tta)]
    return DepthTransform(steps)
