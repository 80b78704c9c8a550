"""Joint image / label transforms: geometry keeps the label aligned with the image, labels keep their values
(only the pad ignore value is new), photometric ranges, normalisation, eval behaviour, input checks."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dinoseg.eval.segmentation.transforms import (
    Normalize,
    PhotoMetricDistortion,
    RandomCropCatMax,
    make_segmentation_train_transforms,
    make_single_view_eval_transforms,
    to_image_and_mask,
)

# Well separated colours, none black (black is the pad value when mean = 0, std = 1).
COLORS = torch.tensor([[230, 30, 30], [30, 200, 40], [40, 60, 230], [230, 220, 40], [200, 40, 210]], dtype=torch.uint8)
LABEL_VALUES = [0, 1, 2, 3, 4]
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # output image = input / 255


def _scene(h: int, w: int, block: int = 8, seed: int = 0):
    """A label of constant blocks and the image painting each class in its colour (ignore = white)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, 5, (-(-h // block), -(-w // block)), generator=g)
    label = grid.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].clone()
    label[: block // 2, : block // 2] = 255
    colors = torch.cat([COLORS, torch.full((251, 3), 255, dtype=torch.uint8)])
    image = colors[label].permute(2, 0, 1).contiguous()
    return image, label


def _decode(image: torch.Tensor) -> torch.Tensor:
    """Class of each pixel of a [0, 1] image: nearest colour."""
    d = ((image.permute(1, 2, 0)[:, :, None, :] * 255 - COLORS.float()) ** 2).sum(-1)
    return d.argmin(-1)


def _interior(label: torch.Tensor, r: int = 2) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood has one label value (away from block edges and image borders)."""
    x = label[None, None].float()
    mx = torch.nn.functional.max_pool2d(x, 2 * r + 1, 1, r)
    mn = -torch.nn.functional.max_pool2d(-x, 2 * r + 1, 1, r)
    inside = torch.zeros_like(label, dtype=torch.bool)
    inside[r:-r, r:-r] = True
    return (mx == mn)[0, 0] & inside


def _check_aligned(image, label, pad_h=0, pad_w=0):
    h, w = label.shape
    valid_h, valid_w = h - pad_h, w - pad_w
    assert (label[valid_h:] == 255).all() and (label[:, valid_w:] == 255).all()
    assert (image[:, valid_h:] == 0).all() and (image[:, :, valid_w:] == 0).all()
    lab, img = label[:valid_h, :valid_w], image[:, :valid_h, :valid_w]
    check = _interior(lab) & (lab != 255)
    assert check.sum() >= 0.2 * lab.numel()
    assert torch.equal(_decode(img)[check], lab[check])
    agree = (_decode(img) == lab)[lab != 255].float().mean()
    assert agree > 0.9


def test_train_pipeline_keeps_mask_aligned_and_label_values():
    image, label = _scene(40, 56, block=16)
    tf = make_segmentation_train_transforms(img_size=40, random_img_size_ratio_range=(0.5, 2.0), crop_size=(32, 48),
                                            flip_prob=0.5, photometric=False, **IDENTITY)
    torch.manual_seed(1)
    shapes = set()
    for _ in range(25):
        out_img, out_lab = tf(image, label)
        assert out_img.dtype == torch.float32 and out_lab.dtype == torch.int64
        assert out_img.shape == (3, 32, 48) and out_lab.shape == (32, 48)
        assert set(out_lab.unique().tolist()) <= set(LABEL_VALUES) | {255}
        pad_h = int((out_lab == 255).all(1).flip(0).int().cumprod(0).sum())
        pad_w = int((out_lab == 255).all(0).flip(0).int().cumprod(0).sum())
        _check_aligned(out_img, out_lab, pad_h, pad_w)
        shapes.add((pad_h > 0, pad_w > 0))
    assert (True, True) in shapes and (False, False) in shapes  # both small (padded) and large (cropped) draws


def test_crop_and_flip_are_exact():
    """An image whose channels encode (row, col, label): the output must read the same positions."""
    h, w = 30, 50
    label = torch.randint(0, 5, (h, w))
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([rows, cols, label]).to(torch.uint8)
    for flip in (0.0, 1.0):
        tf = make_segmentation_train_transforms(img_size=None, random_img_size_ratio_range=None, crop_size=(20, 20),
                                                flip_prob=flip, cat_max_ratio=1.0, photometric=False, **IDENTITY)
        out_img, out_lab = tf(image, label)
        code = (out_img * 255).round().long()
        r, c = code[0], code[1]
        assert torch.equal(code[2], out_lab) and torch.equal(label[r, c], out_lab)
        assert (r == r[:, :1]).all() and (torch.diff(r[:, 0]) == 1).all()  # contiguous rows
        step = -1 if flip else 1
        assert (torch.diff(c, dim=1) == step).all()  # contiguous columns, reversed when flipped


def test_resize_labels_nearest_exact_and_never_interpolated():
    label = torch.tensor([[3, 7], [200, 255]]).repeat_interleave(5, 0).repeat_interleave(6, 1)  # 10 x 12
    image = torch.zeros(3, 10, 12, dtype=torch.uint8)
    for size in (7, 13, 31):
        tf = make_segmentation_train_transforms(img_size=size, random_img_size_ratio_range=None, crop_size=None,
                                                flip_prob=0.0, photometric=False)
        _, out = tf(image, label)
        assert min(out.shape) == size and set(out.unique().tolist()) == {3, 7, 200, 255}
    # a 3x downscale takes the CENTRE pixel of each 3x3 cell, the one the bilinear image pixel is centred on
    # (plain nearest would take the top-left one: a one-pixel shift between label and image)
    fine = torch.randint(0, 50, (30, 45))
    tf = make_segmentation_train_transforms(img_size=10, random_img_size_ratio_range=None, crop_size=None,
                                            flip_prob=0.0, photometric=False)
    _, out = tf(torch.zeros(3, 30, 45, dtype=torch.uint8), fine)
    assert torch.equal(out, fine[1::3, 1::3])
    # a 2x upscale of a block pattern is exact: every label pixel duplicated
    tf = make_segmentation_train_transforms(img_size=20, random_img_size_ratio_range=None, crop_size=None, flip_prob=0.0,
                                            photometric=False)
    _, out = tf(image, label)
    assert torch.equal(out, label.repeat_interleave(2, 0).repeat_interleave(2, 1))


@settings(max_examples=30, deadline=None)
@given(h=st.integers(12, 70), w=st.integers(12, 70), img_size=st.integers(12, 64), crop=st.integers(16, 48),
       lo=st.floats(0.5, 1.0), hi=st.floats(1.0, 2.0), seed=st.integers(0, 2**16))
def test_geometry_property(h, w, img_size, crop, lo, hi, seed):
    image, label = _scene(h, w, block=8, seed=seed)
    torch.manual_seed(seed)
    tf = make_segmentation_train_transforms(img_size=img_size, random_img_size_ratio_range=(lo, hi), crop_size=crop,
                                            flip_prob=0.5, photometric=False, **IDENTITY)
    out_img, out_lab = tf(image, label)
    assert out_img.shape == (3, crop, crop) and out_lab.shape == (crop, crop)
    assert set(out_lab.unique().tolist()) <= set(label.unique().tolist()) | {255}
    valid = out_lab != 255
    # Colour decoding only identifies 8-px blocks that survive the resize: below half scale, antialiasing blends
    # neighbouring blocks and the colour check says nothing about alignment (the shape/value checks above still hold).
    if valid.sum() > 20 and img_size * lo >= 0.5 * min(h, w):
        assert (_decode(out_img) == out_lab)[valid].float().mean() > 0.8


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    label = torch.zeros(64, 64, dtype=torch.long)
    label[:28, :28] = 1
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)

    def balanced_fraction(ratio):
        crop = RandomCropCatMax(32, cat_max_ratio=ratio)
        torch.manual_seed(0)
        ok = 0
        for _ in range(200):
            _, lab = crop(*to_image_and_mask(image, label))
            ok += (lab == 1).float().mean().item() > 0.25
        return ok / 200

    plain, limited = balanced_fraction(1.0), balanced_fraction(0.75)
    assert plain < 0.4 and limited > plain + 0.4


def test_photometric_distortion_ranges_and_label_untouched():
    image = torch.tensor([200, 60, 60], dtype=torch.uint8)[:, None, None].expand(3, 4, 4).float() / 255
    label = torch.randint(0, 5, (4, 4))
    hue_only = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1), hue_range=(-0.1, 0.1))
    h0 = colorsys.rgb_to_hsv(*image[:, 0, 0].tolist())[0]
    torch.manual_seed(0)
    shifts = []
    for _ in range(200):
        out, lab = hue_only(image.clone(), label)
        assert torch.equal(lab, label)
        dh = (colorsys.rgb_to_hsv(*out[:, 0, 0].tolist())[0] - h0 + 0.5) % 1.0 - 0.5
        shifts.append(abs(dh) * 360)
    assert max(shifts) <= 36.5 and max(shifts) > 25  # +-0.1 of the circle = +-36 degrees, and used
    assert sum(s < 1e-3 for s in shifts) > 50  # applied with probability 1/2
    full = make_segmentation_train_transforms(img_size=None, random_img_size_ratio_range=None, crop_size=None,
                                              flip_prob=0, **IDENTITY)
    outs = torch.stack([full((image * 255).to(torch.uint8), label)[0] for _ in range(20)])
    assert outs.min() >= 0 and outs.max() <= 1 and outs.std(0).max() > 0.01  # varies, stays in range


def test_normalisation_default_imagenet_and_0_255_scale():
    image = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    label = torch.zeros(4, 4, dtype=torch.long)
    out, _ = make_single_view_eval_transforms()(image, label)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[:, 0, 0], expected)
    official = make_single_view_eval_transforms(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    torch.testing.assert_close(official(image, label)[0], out)
    with pytest.raises(ValueError, match="std > 0"):
        Normalize((0.5, 0.5, 0.5), (0.0, 1.0, 1.0))


def test_eval_transform_resizes_image_only():
    image, label = _scene(30, 45)
    out_img, out_lab = make_single_view_eval_transforms(img_size=20, **IDENTITY)(image, label)
    assert out_img.shape == (3, 20, 30) and torch.equal(out_lab, label)  # label at its original resolution
    out_img, out_lab = make_single_view_eval_transforms(img_size=None, **IDENTITY)(image, label)
    torch.testing.assert_close(out_img, image.float() / 255) and torch.equal(out_lab, label)


def test_inputs_pil_and_errors():
    image, label = _scene(16, 16)
    pil_img = Image.fromarray(image.permute(1, 2, 0).numpy())
    pil_lab = Image.fromarray(label.numpy().astype(np.uint8))
    tf = make_single_view_eval_transforms(None)
    a, b = tf(pil_img, pil_lab), tf(image, label[None])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match=r"image \(16, 16\) and label \(15, 16\) sizes differ"):
        tf(image, label[:15])
    with pytest.raises(ValueError, match="label must be an integer tensor"):
        tf(image, label.float())
    with pytest.raises(ValueError, match="random_img_size_ratio_range"):
        make_segmentation_train_transforms(img_size=16, random_img_size_ratio_range=(2.0, 1.0))
