"""The official evaluation protocol at any image size: the official crop grid (square crops of the short side when
the image is smaller than the crop in both dimensions), TTA scales from the original image, and no input whose sides
are not multiples of the patch size ever reaching a ViT (the cases of issue 12: 485 x 480 after a 0.9 TTA scale, 384
x 495 after 0.75 on a 512 x 660 image)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinoseg.cli import main
from dinoseg.eval.segmentation.config import load_config
from dinoseg.eval.segmentation.inference import (
    InferenceSettings,
    make_tta_inference,
    slide_crop_boxes,
    slide_inference,
    tta_image_size,
)
from dinoseg.eval.segmentation.setup import build_model, inference_settings
from dinoseg.hub.segmentors import dinov3_vit7b16_ms

from .engine_utils import TINY
from .test_linear_head import tiny_backbone
from .test_m2f import TINY_7B, TINY_HEAD


def official_grid(h_img, w_img, crop, stride):
    """The official sliding-window loop, transcribed independently: its (y1, y2, x1, x2) windows."""
    h_crop = w_crop = crop
    if h_crop > h_img and w_crop > w_img:
        h_crop = w_crop = min(h_img, w_img)
    h_grids = max(h_img - h_crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - w_crop + stride - 1, 0) // stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            boxes.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return boxes


@pytest.mark.parametrize("size", [(485, 480), (480, 485), (384, 495), (480, 619), (512, 512), (300, 437), (700, 900),
                                  (512, 683), (200, 390)])
def test_the_official_crop_grid(size):
    assert slide_crop_boxes(*size, 512, 341) == official_grid(*size, 512, 341)


def test_square_crops_of_the_short_side_on_a_small_image():
    # 485 x 480 (ratio 0.9 of a near-square ADE20K image): two 480 x 480 crops, not one 485 x 480 crop.
    assert slide_crop_boxes(485, 480, 512, 341) == [(0, 480, 0, 480), (5, 485, 0, 480)]
    assert slide_crop_boxes(384, 495, 512, 341) == [(0, 384, 0, 384), (0, 384, 111, 495)]
    # Elongated and small: the official stride would leave a gap (and fail); the stride shrinks to the crop.
    boxes = slide_crop_boxes(100, 480, 512, 341)
    assert boxes == [(0, 100, x, x + 100) for x in range(0, 400, 100)] + [(0, 100, 380, 480)]


class Recorder:
    """Records the size of every image a ViT sees (its patch embedding's input), once per image of a batch."""

    def __init__(self, vit):
        self.sizes = []
        vit.patch_embed.register_forward_pre_hook(
            lambda module, args: self.sizes.extend([tuple(args[0].shape[-2:])] * args[0].shape[0]))


def linear_segmentor():
    torch.manual_seed(0)
    from dinoseg.eval.segmentation.models import build_segmentation_decoder

    vit = tiny_backbone(depth=2)
    return build_segmentation_decoder(vit, "LAST", "linear", num_classes=5).eval(), vit


def m2f_segmentor():
    torch.manual_seed(0)
    model = dinov3_vit7b16_ms(pretrained=False, autocast_dtype=torch.float32, num_classes=5,
                              backbone_options={**TINY_7B, "depth": 4}, **TINY_HEAD).eval()
    return model, model.segmentation_model[0].backbone


@pytest.mark.parametrize("head", ["linear", "m2f"])
@pytest.mark.parametrize("size", [(512, 512), (512, 660), (480, 485)])
def test_tta_075_09_at_any_size(head, size):
    """The failing TTA of the issue, at the real sizes: no crash, the official crops, patch-multiple inputs."""
    model, vit = linear_segmentor() if head == "linear" else m2f_segmentor()
    seen = Recorder(vit)
    x = torch.randn(1, 3, *size)
    settings = InferenceSettings(crop_size=(512, 512), stride=(341, 341), tta_ratios=(0.75, 0.9), use_flip=True,
                                 small_size=512, decoder_head_type=head)
    with torch.no_grad():
        probs = settings(x, model, rescale_to=size)
    assert probs.shape == (1, 5, *size) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(1, *size))
    # Every crop the official protocol takes, at every scale and flip, and nothing else.
    expected = []
    for ratio in (0.75, 0.9):
        h, w = tta_image_size(*size, 512, ratio)
        crops = [(y2 - y1, x2 - x1) for y1, y2, x1, x2 in official_grid(h, w, 512, 341)]
        expected += crops * 2  # the image and its flip
    if head == "linear":
        assert sorted(seen.sizes) == sorted(expected)
    else:  # the adapter pads to its stride-32 grid
        assert sorted(seen.sizes) == sorted((-(-h // 32) * 32, -(-w // 32) * 32) for h, w in expected)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in seen.sizes)


def test_slide_on_the_exact_failing_input_equals_the_official_algorithm():
    """485 x 480 with 512 crops (the linear-head crash of the issue) gives the official two-crop average."""
    model, vit = linear_segmentor()
    x = torch.randn(1, 3, 485, 480)
    with torch.no_grad():
        got = slide_inference(x, model, "linear", 5, (512, 512), (341, 341))
        total, count = torch.zeros(1, 5, 485, 480), torch.zeros(1, 1, 485, 480)
        for y1, y2, x1, x2 in official_grid(485, 480, 512, 341):
            total[..., y1:y2, x1:x2] += model.predict(x[..., y1:y2, x1:x2], rescale_to=(y2 - y1, x2 - x1))
            count[..., y1:y2, x1:x2] += 1
    torch.testing.assert_close(got, total / count, atol=1e-6, rtol=0)


def test_crops_off_the_patch_grid_are_padded():
    """A crop size the image forces off the patch grid (300 x 300 squares) is padded, predicted and cropped back."""
    model, vit = linear_segmentor()
    seen = Recorder(vit)
    x = torch.randn(1, 3, 300, 437)
    with torch.no_grad():
        got = slide_inference(x, model, crop_size=512, stride=341)
        first = x[..., :300, :300]
        padded = torch.nn.functional.pad(first, (0, 4, 0, 4))
        reference = model.predict(padded, rescale_to=(304, 304))[..., :300, :300]
    assert seen.sizes[0] == (304, 304) and all(h % 16 == 0 and w % 16 == 0 for h, w in seen.sizes)
    torch.testing.assert_close(got[..., :300, :137], reference[..., :137], atol=1e-6, rtol=0)
    # Whole-image mode on a size off the grid too.
    with torch.no_grad():
        whole = make_tta_inference(x, model, rescale_to=(300, 437), inference_mode="whole", crop_size=(300, 437))
    assert whole.shape == (1, 5, 300, 437) and seen.sizes[-1] == (304, 448)


def test_config_tta_takes_scales_from_the_original_image(tmp_path):
    """Through the config: with TTA the eval transform keeps the original image and every scale is resized from it
    with the official size rule (not from the already resized image)."""
    cfg = load_config([], [*TINY, "eval.use_tta=true", "transforms.eval.img_size=64", "transforms.eval.tta_ratios=[0.75,1.1]",
                           f"output_dir={tmp_path}"])
    settings = inference_settings(cfg)
    assert settings.small_size == 64 and settings.tta_ratios == (0.75, 1.1) and settings.use_flip
    from dinoseg.eval.segmentation.setup import build_eval_transforms

    image = torch.randint(0, 256, (3, 97, 130), dtype=torch.uint8)
    out, _ = build_eval_transforms(cfg)(image, torch.zeros(97, 130, dtype=torch.long))
    assert out.shape == (3, 97, 130)  # kept as it is
    model = build_model(cfg, 5).eval()
    seen = Recorder(model.segmentation_model[0].feature_model)
    with torch.no_grad():
        settings(out[None], model, rescale_to=(97, 130))
    sizes = {tta_image_size(97, 130, 64, r) for r in (0.75, 1.1)}
    assert sizes == {(64, 86), (70, 94)}
    crops = {(y2 - y1, x2 - x1) for s in sizes for y1, y2, x1, x2 in official_grid(*s, 48, 32)}
    assert {(-(-h // 16) * 16, -(-w // 16) * 16) for h, w in crops} == set(seen.sizes)


def _ade20k_val(root, sizes):
    rng = np.random.default_rng(0)
    for sub in ("images/validation", "annotations/validation", "images/training", "annotations/training"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        stem = f"ADE_val_{i + 1:08d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images/validation" / f"{stem}.jpg")
        Image.fromarray(rng.integers(0, 6, (h, w), dtype=np.uint8)).save(root / "annotations/validation" / f"{stem}.png")


def test_dinoseg_eval_with_tta_on_the_issue_sizes(tmp_path):
    """`dinoseg eval ... eval.use_tta=true transforms.eval.tta_ratios=[0.75,0.9]` on ADE20K images of 512 x 512,
    512 x 660 and 480 x 485 with a linear head (the run that ended in a traceback)."""
    root = tmp_path / "ADEChallengeData2016"
    _ade20k_val(root, [(512, 512), (512, 660), (480, 485)])
    common = [*TINY, "model.backbone_kwargs.depth=2", f"datasets.root={root}", "datasets.val=ADE20K:split=VAL",
              "decoder_head.num_classes=150", "eval.crop_size=512", "eval.stride=341", "transforms.eval.img_size=512"]
    cfg = load_config([], [*common, f"output_dir={tmp_path / 'run'}"])
    head = {k: v for k, v in build_model(cfg, 150).state_dict().items() if k.startswith("segmentation_model.1.")}
    torch.save({"model": head}, tmp_path / "head.pth")
    out = tmp_path / "eval"
    code = main(["eval", *common, f"head={tmp_path / 'head.pth'}", "eval.use_tta=true",
                 "transforms.eval.tta_ratios=[0.75,0.9]", f"output_dir={out}"])
    assert code == 0
    results = json.loads((out / "eval" / "head" / "results-semantic-segmentation.json").read_text())
    assert results["num_samples"] == 3 and 0 <= results["mIoU"] <= 1


@pytest.mark.parametrize(("backbone_dtype", "precision", "expected"), [
    (None, torch.float32, torch.float32),  # dinoseg's default: the backbone follows the segmentor's precision
    (None, torch.bfloat16, torch.bfloat16),
    ("bfloat16", torch.float32, torch.bfloat16),  # the official placement: backbone bfloat16, the rest float32
    ("float32", torch.bfloat16, torch.float32),
])
def test_adapter_backbone_precision(backbone_dtype, precision, expected):
    from dinoseg.eval.segmentation.models import AdapterOptions, Mask2FormerOptions

    options = Mask2FormerOptions(**{**vars(TINY_HEAD["m2f_options"]),
                                    "adapter": AdapterOptions(conv_inplane=16, deform_num_heads=4,
                                                              backbone_dtype=backbone_dtype)})
    model = dinov3_vit7b16_ms(pretrained=False, autocast_dtype=precision, hidden_dim=32, m2f_options=options,
                              backbone_options=TINY_7B).eval()
    dtypes, head_dtypes = [], []
    model.segmentation_model[0].backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    model.segmentation_model[1].predictor.class_embed.register_forward_hook(lambda m, a, out: head_dtypes.append(out.dtype))
    with torch.no_grad():
        model.predict(torch.randn(1, 3, 64, 64), rescale_to=(64, 64))
    assert set(dtypes) == {expected} and set(head_dtypes) == {precision}
