"""Evaluation masks: the standard crops of NYU (Eigen) and KITTI (Garg, Eigen) and the ignored value."""

from enum import Enum

import torch


class _EvalCropType(Enum):
    NYU_EIGEN = "NYU_EIGEN"  # rows 45:471, columns 41:601 of a 480 x 640 NYU image
    FULL = "FULL"
    KITTI_GARG = "KITTI_GARG"  # Garg et al.: rows 40.8%..99.2%, columns 3.6%..96.4%
    KITTI_EIGEN = "KITTI_EIGEN"  # Eigen et al.: rows 33.2%..91.4%, columns 3.6%..96.4%


# (top, bottom, left, right) as fractions of the height / width.
_CROP_FRACTIONS = {
    _EvalCropType.NYU_EIGEN: (45 / 480, 471 / 480, 41 / 640, 601 / 640),
    _EvalCropType.KITTI_GARG: (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    _EvalCropType.KITTI_EIGEN: (0.3324324, 0.91351351, 0.0359477, 0.96405229),
}


def parse_eval_crop(value: "_EvalCropType | str") -> _EvalCropType:
    if isinstance(value, _EvalCropType):
        return value
    try:
        return _EvalCropType(str(value).strip().upper())
    except ValueError:
        raise ValueError(f"unknown eval crop {value!r}; expected one of {[m.value for m in _EvalCropType]}") from None


def make_valid_mask(input: torch.Tensor, eval_crop: _EvalCropType | str = _EvalCropType.FULL,
                    ignored_value: float = 0.0) -> torch.Tensor:
    """Boolean mask [B, C, H, W] of the pixels of `input` (B x C x H x W depth) inside the evaluation crop whose
    channels are not all equal to `ignored_value`. Crop bounds scale with the image size (``int(fraction * size)``)."""
    if input.ndim != 4:
        raise ValueError(f"make_valid_mask: expected a [B, C, H, W] tensor, got shape {tuple(input.shape)}")
    crop = parse_eval_crop(eval_crop)
    h, w = input.shape[-2:]
    mask = torch.zeros(input.shape, dtype=torch.bool, device=input.device)
    if crop == _EvalCropType.FULL:
        mask.fill_(True)
    else:
        top, bottom, left, right = _CROP_FRACTIONS[crop]
        mask[..., int(top * h) : int(bottom * h), int(left * w) : int(right * w)] = True
    ignored = (input == ignored_value).all(dim=1, keepdim=True)
    return mask & ~ignored
