from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dinoseg.eval.segmentation.inference import (
    AccumulatorBuffer,
    _first_cover_plan,
    make_inference,
    make_tta_inference,
    mask_classification_to_semantic,
    slide_crop_boxes,
    slide_inference,
    tta_image_size,
)

from .test_linear_head import LINEAR_FIXTURES, official_segmentor

softmax = partial(F.softmax, dim=1)


class ConvSegmentor(nn.Module):
    """Cheap stand-in with the segmentor `predict` API; records the input shape of every call."""

    def __init__(self, num_classes=3, kernel_size=1, stride=1, m2f_queries=0):
        super().__init__()
        self.conv = nn.Conv2d(
            3, m2f_queries or num_classes, kernel_size, stride=stride, padding=kernel_size // 2
        )
        self.class_logits = nn.Parameter(torch.randn(m2f_queries, num_classes + 1)) if m2f_queries else None
        self.calls = []

    def predict(self, x, rescale_to):
        self.calls.append(tuple(x.shape))
        out = F.interpolate(self.conv(x), size=tuple(rescale_to), mode="bilinear")
        if self.class_logits is None:
            return out
        return {"pred_logits": self.class_logits.expand(x.shape[0], -1, -1), "pred_masks": out}


@pytest.mark.parametrize("name", LINEAR_FIXTURES)
def test_slide_matches_official(official_index, name):
    segmentor, ref = official_segmentor(official_index, name)
    crop, stride = official_index[name]["crop_size"], official_index[name]["stride"]
    x = ref["slide_x"]
    for crop_batch_size in (1, 4):
        logits = slide_inference(
            x, segmentor, crop_size=(crop, crop), stride=(stride, stride), crop_batch_size=crop_batch_size
        )
        torch.testing.assert_close(logits, ref["slide_logits"], atol=1e-5, rtol=1e-5)
    # Two images per call, crops of both images mixed in one model batch.
    two = slide_inference(
        torch.cat([x, x.flip(-1)]), segmentor, crop_size=crop, stride=stride, crop_batch_size=5, n_output_channels=7
    )
    torch.testing.assert_close(two[:1], ref["slide_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        two[1:], slide_inference(x.flip(-1), segmentor, crop_size=crop, stride=stride), atol=1e-5, rtol=1e-5
    )
    h, w = x.shape[-2:]
    probs = make_inference(
        x,
        segmentor,
        "slide",
        rescale_to=(2 * h, 2 * w),
        crop_size=crop,
        stride=stride,
        apply_horizontal_flip=True,
        output_activation=softmax,
        crop_batch_size=3,
    )
    torch.testing.assert_close(probs, ref["slide_flipped_softmax_2x"], atol=1e-5, rtol=1e-5)


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    crop_h=st.integers(1, 24),
    crop_w=st.integers(1, 24),
    data=st.data(),
)
def test_any_crop_grid_covers_every_pixel(height, width, crop_h, crop_w, data):
    stride = (data.draw(st.integers(1, crop_h)), data.draw(st.integers(1, crop_w)))
    boxes = slide_crop_boxes(height, width, (crop_h, crop_w), stride)
    count = torch.zeros(height, width, dtype=torch.int32)
    # The official rule: square crops of the short side for an image smaller than the crop in both dimensions.
    small = crop_h > height and crop_w > width
    expected = (min(height, width),) * 2 if small else (min(crop_h, height), min(crop_w, width))
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width
        assert (y2 - y1, x2 - x1) == expected
        count[y1:y2, x1:x2] += 1
    assert (count > 0).all()
    assert boxes[-1][1] == height and boxes[-1][3] == width  # the last crop is aligned to the border
    # The rectangles a window covers first partition the image; the rest of each window was covered before.
    first = torch.zeros(height, width, dtype=torch.int32)
    for (y1, y2, x1, x2), (new, seen) in zip(boxes, _first_cover_plan(boxes)):
        first[new[0] : new[1], new[2] : new[3]] += 1
        area = sum((r[1] - r[0]) * (r[3] - r[2]) for r in [new, *seen])
        assert area == (y2 - y1) * (x2 - x1)
    assert (first == 1).all()


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(8, 40),
    width=st.integers(8, 40),
    extra=st.integers(0, 8),
    extra_on_height=st.booleans(),
    batch=st.integers(1, 2),
    m2f=st.booleans(),
)
def test_slide_with_a_crop_as_big_as_the_image_is_whole_inference(
    height, width, extra, extra_on_height, batch, m2f
):
    """A crop equal to the image in one dimension and at least as large in the other is one window (the official
    square rule applies only when the crop is larger in both)."""
    torch.manual_seed(0)
    model = ConvSegmentor(kernel_size=5, stride=2, m2f_queries=4 if m2f else 0)
    x = torch.randn(batch, 3, height, width)
    crop = (height + extra, width) if extra_on_height else (height, width + extra)
    with torch.no_grad():
        slide = slide_inference(x, model, crop_size=crop, stride=crop)
        whole = make_inference(x, model, "whole", rescale_to=(height, width), crop_size=(height, width))
    assert len(model.calls) == 2
    torch.testing.assert_close(slide, whole)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(4, 30),
    width=st.integers(4, 30),
    crop=st.integers(2, 12),
    data=st.data(),
)
def test_slide_averages_overlapping_crops_exactly(height, width, crop, data):
    """With a per-pixel model every crop agrees on every pixel, so any grid must give the whole prediction;
    `out` starts as NaN, so a pixel that no crop wrote would show."""
    stride = data.draw(st.integers(1, crop))
    crop_batch_size = data.draw(st.integers(1, 7))
    model = ConvSegmentor(kernel_size=1)
    x = torch.randn(2, 3, height, width)
    out = torch.full((2, 3, height, width), float("nan"))
    with torch.no_grad():
        slide = slide_inference(x, model, crop_size=crop, stride=stride, crop_batch_size=crop_batch_size, out=out)
        whole = model.predict(x, rescale_to=(height, width))
    assert slide is out
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)
    n_crops = len(slide_crop_boxes(height, width, crop, stride))
    assert len(model.calls) == -(-2 * n_crops // crop_batch_size) + 1
    assert all(c[0] <= crop_batch_size for c in model.calls[:-1])  # the last call is the whole prediction


def test_mask_classification_to_semantic():
    logits, masks = torch.randn(2, 5, 4), torch.randn(2, 5, 6, 7)
    expected = torch.zeros(2, 3, 6, 7)
    for q in range(5):
        expected += logits[:, q].softmax(-1)[:, :3, None, None] * masks[:, q, None].sigmoid()
    torch.testing.assert_close(mask_classification_to_semantic(logits, masks), expected)
    out = mask_classification_to_semantic(logits.bfloat16(), masks.bfloat16())
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="pred_masks"):
        mask_classification_to_semantic(logits, masks[:, :4])


def test_whole_mode_uses_the_configured_size():
    model = ConvSegmentor()
    x = torch.randn(1, 3, 20, 30)
    out = make_inference(x, model, "whole", rescale_to=(10, 15), crop_size=(32, 48))
    assert model.calls == [(1, 3, 32, 48)] and out.shape == (1, 3, 10, 15)
    make_inference(x, model, "whole", rescale_to=(10, 15))
    assert model.calls[-1] == (1, 3, 512, 512)  # the official whole-image size


def test_tta_image_size_follows_the_official_rule():
    assert tta_image_size(512, 683, 512, 1.0) == (512, 683)
    assert tta_image_size(512, 683, 512, 0.5) == (256, 342)
    assert tta_image_size(512, 683, 512, 0.6) == (320, 427)  # int(307.2) = 307 -> next multiple of 32
    assert tta_image_size(512, 683, 512, 1.1) == (563, 751)  # no rounding above 1
    assert tta_image_size(683, 512, 512, 0.75) == (512, 384)  # portrait: the width is the short side
    assert tta_image_size(300, 400, 512, 1.0) == (512, 683)  # from the original size
    with pytest.raises(ValueError, match="ratio"):
        tta_image_size(10, 10, 512, 0.0)


def test_tta_averages_scales_and_flips():
    torch.manual_seed(0)
    model = ConvSegmentor(kernel_size=3)
    x = torch.randn(2, 3, 30, 40)
    options = {"rescale_to": (30, 40), "crop_size": 16, "stride": 10, "crop_batch_size": 4, "inference_mode": "slide"}
    with torch.no_grad():
        tta = make_tta_inference(
            x, model, tta_ratios=(1.0, 0.5, 1.5), use_flip=True, small_size=30, **options
        )
        expected = torch.zeros(2, 3, 30, 40)
        for ratio in (1.0, 0.5, 1.5):
            size = tta_image_size(30, 40, 30, ratio)
            scaled = x if ratio == 1.0 else F.interpolate(x, size=size, mode="bilinear", antialias=True)
            expected += make_inference(scaled, model, output_activation=softmax, **options)
            flipped = make_inference(scaled.flip(-1), model, apply_horizontal_flip=True, **options)
            expected += flipped.softmax(1)
        expected /= 6
        torch.testing.assert_close(tta, expected)
        # No TTA: a single slide prediction, softmaxed.
        plain = make_tta_inference(x, model, **options)
        torch.testing.assert_close(
            plain, make_inference(x, model, output_activation=softmax, **options)
        )


def test_accumulator_buffer_is_reused_and_grows():
    torch.manual_seed(0)
    model = ConvSegmentor(kernel_size=3)
    buffer = AccumulatorBuffer()
    big, small = torch.randn(1, 3, 30, 40), torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        first = slide_inference(big, model, crop_size=16, stride=10, buffer=buffer)
        torch.testing.assert_close(first, slide_inference(big, model, crop_size=16, stride=10))
        assert buffer.holds(first) and not buffer.holds(first.clone())
        ptr = first.data_ptr()
        # A smaller request (other shape, two images) is a view of the same memory, with the right values.
        second = slide_inference(small, model, crop_size=16, stride=10, buffer=buffer)
        assert second.data_ptr() == ptr and second.is_contiguous() and second.shape == (2, 3, 20, 20)
        torch.testing.assert_close(second, slide_inference(small, model, crop_size=16, stride=10))
        # A larger one replaces the block.
        third = slide_inference(torch.randn(1, 3, 50, 40), model, crop_size=16, stride=10, buffer=buffer)
        assert third.numel() > first.numel() and buffer.holds(third) and not buffer.holds(first)
        buffer.clear()
        assert not buffer.holds(third)
    with pytest.raises(ValueError, match="out or buffer"):
        slide_inference(big, model, crop_size=16, stride=10, out=torch.empty(1, 3, 30, 40), buffer=AccumulatorBuffer())


@pytest.mark.parametrize("activation", [None, softmax])
def test_tta_with_a_buffer_equals_tta_without(activation):
    """Without an activation the first prediction is a view of the buffer; the sum must not be overwritten."""
    torch.manual_seed(0)
    model = ConvSegmentor(kernel_size=3)
    x = torch.randn(1, 3, 30, 40)
    options = {"rescale_to": (30, 40), "crop_size": 16, "stride": 10, "output_activation": activation,
               "inference_mode": "slide"}
    buffer = AccumulatorBuffer()
    with torch.no_grad():
        for ratios, flip in (((1.0,), False), ((1.0,), True), ((1.0, 1.0), False), ((1.0, 0.5), True)):
            expected = make_tta_inference(x, model, tta_ratios=ratios, use_flip=flip, **options)
            got = make_tta_inference(x, model, tta_ratios=ratios, use_flip=flip, buffer=buffer, **options)
            torch.testing.assert_close(got, expected)


def test_tta_holds_only_the_sum_between_predictions():
    """While the model predicts the next scale or flip, the earlier full-size predictions are gone but for the running
    sum (for the 7B segmentor under the official protocol each is 612 MiB of GPU memory)."""
    import weakref

    outputs = []

    def activation(t):
        out = t.softmax(1)
        outputs.append(weakref.ref(out))
        return out

    class Watching(ConvSegmentor):
        def predict(self, x, rescale_to):
            alive = sum(ref() is not None for ref in outputs)
            assert alive <= 1, f"{alive} earlier predictions alive at model call {len(self.calls) + 1}"
            return super().predict(x, rescale_to)

    model = Watching(kernel_size=3)
    with torch.no_grad():
        make_tta_inference(torch.randn(1, 3, 30, 40), model, (30, 40), tta_ratios=(1.0, 0.5, 1.5), use_flip=True,
                           small_size=30, inference_mode="slide", crop_size=16, stride=10, output_activation=activation)
    assert len(outputs) == 6


def test_num_max_forward_pads_model_calls():
    model = ConvSegmentor()
    slide_inference(torch.randn(1, 3, 20, 20), model, crop_size=16, stride=8, crop_batch_size=2, num_max_forward=5)
    assert len(model.calls) == 5 and model.calls[-1] == (2, 3, 16, 16)


def test_bad_arguments_raise():
    model = ConvSegmentor()
    x = torch.randn(1, 3, 20, 20)
    with pytest.raises(ValueError, match="larger than crop_size"):
        slide_inference(x, model, crop_size=8, stride=9)
    with pytest.raises(ValueError, match="crop_size"):
        slide_inference(x, model, crop_size=0, stride=1)
    with pytest.raises(ValueError, match="inference_mode"):
        make_inference(x, model, "tiles")
    with pytest.raises(ValueError, match="needs crop_size"):
        make_inference(x, model, "slide")
    with pytest.raises(ValueError, match="out must be"):
        slide_inference(x, model, crop_size=8, stride=8, out=torch.zeros(1, 3, 20, 21))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        slide_inference(x[0], model, crop_size=8, stride=8)
