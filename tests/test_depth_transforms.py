"""Depth transforms: parity of the eval transforms with the official outputs; the training augmentations."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinoseg.eval.depth.transforms import (
    ColorAug,
    FixedCrop,
    LeftRightFlipAug,
    RandomCrop,
    RandomRotation,
    make_depth_eval_transforms,
    make_depth_train_transforms,
)

from ._depth_fixtures import load_depth_fixture

DATA = load_depth_fixture("eval_transforms.pt")


def _pil_pair(i):
    return Image.fromarray(DATA["images"][i].numpy()), Image.fromarray(DATA["depths"][i].numpy().astype(np.uint16))


@pytest.mark.parametrize("case", DATA["cases"], ids=lambda c: f"{c['img_size']}-{c['fixed_crop']}-tta{c['tta']}")
def test_eval_transforms_match_official(case):
    transform = make_depth_eval_transforms(normalization_constant=case["normalization_constant"], img_size=case["img_size"],
                                           fixed_crop=case["fixed_crop"], tta=case["tta"])
    for i, expected in enumerate(case["outputs"]):
        image, depth = _pil_pair(i)
        assert depth.mode == "I;16"
        images, depths = transform(image, depth)
        assert len(images) == len(expected["images"]) == (2 if case["tta"] else 1)
        for ours, ref in zip(images + depths, expected["images"] + expected["labels"]):
            assert ours.shape == ref.shape and ours.dtype == torch.float32
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
        # A dataset's tensors (uint8 image, float depth in stored units) give the same result as PIL images.
        tensors = transform(DATA["images"][i].permute(2, 0, 1), DATA["depths"][i].float()[None])
        for ours, ref in zip(tensors[0] + tensors[1], images + depths):
            torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_fixed_crops():
    assert FixedCrop("NYU").box(480, 640) == (45, 43, 427, 565)  # official box (43, 45, 608, 472) as (x1, y1, x2, y2)
    assert FixedCrop("kitti_kb").box(375, 1242) == (23, 13, 352, 1216)
    assert FixedCrop("FULL").box(10, 20) == (0, 0, 10, 20)
    with pytest.raises(ValueError, match="KITTI_KB crop needs an image of at least 352 x 1216"):
        FixedCrop("KITTI_KB").box(300, 1242)
    with pytest.raises(ValueError, match="unknown fixed_crop 'EIGEN'"):
        FixedCrop("EIGEN")


def _aligned_pair(h=48, w=64):
    """An image whose first channel encodes the depth (depth in mm / 10000), and a depth map with holes."""
    depth = torch.randint(500, 9000, (1, h, w)).float()
    depth[:, ::7, ::5] = 0
    image = torch.stack([depth[0] / 10000, torch.rand(h, w), torch.rand(h, w)])
    return image, depth


def test_train_transforms_output_shape_units_and_alignment():
    torch.manual_seed(3)
    transform = make_depth_train_transforms(normalization_constant=1000, random_crop_size=(32, 40), rotation_angle=0,
                                            brightness_range=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
    transform.transforms = [t for t in transform.transforms if not isinstance(t, ColorAug)]  # keep colours exact
    flips = 0
    for _ in range(8):
        image, depth = _aligned_pair()
        out_image, out_depth = transform(image, depth)
        assert out_image.shape == (3, 32, 40) and out_depth.shape == (1, 32, 40)
        torch.testing.assert_close(out_image[0] * 10, out_depth[0])  # moved together, depth now in metres
        flips += int(not any(torch.equal(out_depth[0], (depth[0] / 1000)[r:r + 32, c:c + 40])
                             for r in range(17) for c in range(25)))
    assert 0 < flips < 8  # horizontal flips happen about half the time


def test_rotation_moves_depth_by_nearest_neighbour_and_fills_holes_with_zero():
    torch.manual_seed(0)
    image, depth = _aligned_pair()
    out_image, out_depth = RandomRotation(10.0, p=1.0)(image, depth)
    assert set(out_depth.unique().tolist()) <= set(depth.unique().tolist())  # no interpolated depth values
    assert (out_depth[0, 0, :3] == 0).any()  # corners left uncovered are missing depth
    assert RandomRotation(10.0, p=0.0)(image, depth)[1] is depth


def test_random_crop_pads_small_images_with_missing_depth():
    image, depth = _aligned_pair(20, 30)
    out_image, out_depth = RandomCrop((32, 40))(image, depth)
    assert out_image.shape == (3, 32, 40) and torch.equal(out_depth[:, :20, :30], depth)
    assert (out_depth[:, 20:] == 0).all() and (out_depth[:, :, 30:] == 0).all()


def test_color_aug_formula_and_probability():
    image = torch.rand(3, 8, 8)
    assert ColorAug(prob=0.0)(image, None)[0] is image
    torch.manual_seed(1)
    out = ColorAug(prob=1.0, gamma_range=(1.2, 1.2), brightness_range=(0.5, 0.5), color_range=(1.0, 1.0))(image, None)[0]
    torch.testing.assert_close(out, ((image * 255) ** 1.2 * 0.5).clamp(0, 255) / 255)
    torch.manual_seed(1)
    bright = ColorAug(prob=1.0, brightness_range=(3.0, 3.0))(image, None)[0]
    assert bright.max() <= 1.0 and (bright == 1.0).any()  # clipped to the image range


def test_flip_tta_inverse_averages_the_unflipped_predictions():
    aug = LeftRightFlipAug(flip=True)
    x = torch.rand(2, 1, 4, 6)
    stacked = torch.cat([x, torch.flip(x, dims=[-1])])
    torch.testing.assert_close(aug.inverse(stacked), x)
    images, depths = aug(torch.rand(3, 4, 6), torch.rand(1, 4, 6))
    assert len(images) == len(depths) == 2 and torch.equal(images[1], torch.flip(images[0], dims=[-1]))
    with pytest.raises(ValueError, match="even size"):
        aug.inverse(torch.rand(3, 1, 4, 6))
    assert LeftRightFlipAug(flip=False).inverse(x) is x


def test_bad_inputs_are_named():
    transform = make_depth_eval_transforms(normalization_constant=1000)
    with pytest.raises(ValueError, match=r"image \(4, 4\) and depth \(5, 5\) sizes differ"):
        transform(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(5, 5))
    with pytest.raises(ValueError, match="depth image has mode 'RGB'"):
        transform(Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="normalization factor must be > 1e-6"):
        make_depth_eval_transforms(normalization_constant=0)
