"""Whole-image, sliding-window and test-time-augmented inference for segmentors with a `predict` method.

`make_inference` and `slide_inference` take the official DINOv3 arguments in the official order, with the official
effect (crop grid with the last crop aligned to the border, square crops of the short side for an image smaller
than the crop in both dimensions, per-pixel averaging of overlapping crops, resize to `rescale_to`, un-flip, output
activation, `decoder_head_type="m2f"` rounding Mask2Former class scores through bfloat16 in slide mode,
`num_max_forward` padding the model calls, whole-image mode at 512 x 512). Beyond that, and without changing a
result the official code produces:
- crops go through the model in batches of `crop_batch_size`, from any number of images per call;
- every crop's scores are written / added into its window of a float32 accumulator that stays on the model's device
  (no crop is padded to the full image, nothing goes through the host; the official slide result is on the CPU);
- a crop (or whole image) whose sides are not multiples of the backbone's patch size is zero-padded at the
  bottom / right and its prediction cropped back (the official backbone drops the remainder or fails);
- a stride larger than a crop shrunk to a small image is reduced to the crop (the official grid leaves pixels
  uncovered and fails);
- the overlap count is float32 (the official int8 count overflows past 127 overlapping crops);
- Mask2Former outputs are recognised without `decoder_head_type` and then turned into class scores in float32;
- `n_output_channels` defaults to the model's number of outputs (official: 256, which fails for any other count);
- whole-image mode resizes to `crop_size` when one is given;
- TTA (`make_tta_inference`) resizes each scale on the fly instead of holding a list of pre-resized copies;
- an `AccumulatorBuffer` lets a loop over images reuse the accumulator's memory (eval and predict do).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ...data.transforms import to_pair

__all__ = [
    "AccumulatorBuffer",
    "InferenceMode",
    "InferenceSettings",
    "make_inference",
    "make_tta_inference",
    "mask_classification_to_semantic",
    "slide_crop_boxes",
    "slide_inference",
    "tta_image_size",
    "whole_image_size",
]

_SOFTMAX = partial(F.softmax, dim=1)


class InferenceMode(Enum):
    WHOLE = "whole"
    SLIDE = "slide"


HEAD_TYPES = ("linear", "m2f")  # official `decoder_head_type` values


def mask_classification_to_semantic(pred_logits: torch.Tensor, pred_masks: torch.Tensor, *,
                                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-class scores [B, C, H, W] (float32) from Mask2Former outputs (logits [B, Q, C+1], masks [B, Q, H, W]).

    The last logit is the "no object" class and is dropped after the softmax. The class probabilities and mask
    probabilities are combined in `dtype` (the official slide inference uses bfloat16, its whole-image mode float32).
    """
    if pred_logits.ndim != 3 or pred_masks.ndim != 4 or pred_logits.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(
            f"mask_classification_to_semantic: expected pred_logits [B, Q, C+1] and pred_masks [B, Q, H, W], "
            f"got {tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}"
        )
    class_probs = pred_logits.float().softmax(dim=-1)[..., :-1]
    mask_probs = pred_masks.float().sigmoid()
    return torch.einsum("bqc,bqhw->bchw", class_probs.to(dtype), mask_probs.to(dtype)).float()


def _check_head_type(decoder_head_type) -> str:
    if decoder_head_type not in HEAD_TYPES:  # a DecoderType member compares equal to its value
        if not isinstance(decoder_head_type, str):
            raise TypeError(
                f"decoder_head_type must be 'linear' or 'm2f', got {decoder_head_type!r}: the third argument of "
                "slide_inference is decoder_head_type (official order); pass crop_size= and stride= by keyword"
            )
        raise ValueError(f"unknown decoder_head_type {decoder_head_type!r}; expected one of {list(HEAD_TYPES)}")
    return str(getattr(decoder_head_type, "value", decoder_head_type))


def _class_scores(output, decoder_head_type: str = "linear", m2f_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-class scores from a head's `predict` output: logits as they are, or a Mask2Former dict (recognised
    whatever `decoder_head_type` says; with "m2f" its scores are combined in `m2f_dtype`)."""
    if isinstance(output, dict):
        missing = {"pred_logits", "pred_masks"} - output.keys()
        if missing:
            raise KeyError(f"segmentor predict() returned a dict without {sorted(missing)}")
        dtype = m2f_dtype if decoder_head_type == "m2f" else torch.float32
        return mask_classification_to_semantic(output["pred_logits"], output["pred_masks"], dtype=dtype)
    if not torch.is_tensor(output) or output.ndim != 4:
        raise TypeError(
            f"segmentor predict() must return [B, C, H, W] scores or a Mask2Former dict, got {output!r:.80}"
        )
    if decoder_head_type == "m2f":
        raise TypeError("decoder_head_type='m2f' but the segmentor's predict() returned a tensor, not Mask2Former outputs")
    return output


class AccumulatorBuffer:
    """Float32 memory for `slide_inference` accumulators, kept across calls (one block per device).

    A loop over images passes the same buffer to every call: the accumulator is then a view of memory that
    earlier calls already touched instead of a fresh allocation. On CPU a fresh result costs its first touch:
    page faults, and on virtual machines that hand freed memory back to the host, the host providing it again
    (0.3-2 s for a 1.2 GiB result, as much as 10% of a ViT-S slide pass). The block grows to the largest
    accumulator requested and is freed with the buffer (or by `clear()`).

    A result that is a view of the buffer (slide output with no resize, flip or activation) is overwritten by
    the next call that uses the same buffer; `holds(t)` tells whether `t` is one.
    """

    def __init__(self):
        self._blocks: dict[torch.device, torch.Tensor] = {}

    def get(self, shape, device) -> torch.Tensor:
        """A contiguous float32 tensor of `shape` on `device` with undefined content."""
        device = torch.device(device)
        numel = math.prod(shape)
        block = self._blocks.get(device)
        if block is None or block.numel() < numel:
            self._blocks.pop(device, None)  # free the smaller block before allocating the larger one
            block = self._blocks[device] = torch.empty(numel, device=device, dtype=torch.float32)
        return block[:numel].view(tuple(shape))

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` shares memory with this buffer."""
        block = self._blocks.get(tensor.device)
        return block is not None and tensor.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()

    def clear(self) -> None:
        self._blocks.clear()


def _backbone_side(segmentation_model: nn.Module) -> nn.Module:
    return getattr(segmentation_model, "segmentation_model", [segmentation_model])[0]


def whole_image_size(image: torch.Tensor, segmentation_model: nn.Module) -> tuple[int, int]:
    """The image's size rounded up to the backbone's patch grid (whole-image mode at the image's own size)."""
    # A model that names no patch size takes any size; a ConvNeXt (patch size None) its coarsest stride, 32.
    patch = getattr(_backbone_side(segmentation_model), "patch_size", 1) or 32
    return tuple(-(-s // patch) * patch for s in image.shape[-2:])


def _input_multiple(segmentation_model: nn.Module) -> int:
    """What the sides of an input must be multiples of: the ViT's patch size; 1 for a backbone side that pads its
    input itself (the ViT-Adapter) or takes any size (a ConvNeXt, a model without a backbone side)."""
    side = _backbone_side(segmentation_model)
    patch = getattr(side, "patch_size", None)
    return patch if isinstance(patch, int) and not hasattr(side, "size_divisor") else 1


def _predict_scores(segmentation_model: nn.Module, x: torch.Tensor, rescale_to: tuple[int, int], multiple: int,
                    decoder_head_type: str, m2f_dtype: torch.dtype) -> torch.Tensor:
    """Class scores [B, C, *rescale_to] of `x`; sides that are not multiples of `multiple` are zero-padded at the
    bottom / right, predicted at the padded size and cropped back before the resize to `rescale_to`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return _class_scores(segmentation_model.predict(x, rescale_to=rescale_to), decoder_head_type, m2f_dtype)
    padded = (h + pad_h, w + pad_w)
    out = segmentation_model.predict(F.pad(x, (0, pad_w, 0, pad_h)), rescale_to=padded)
    scores = _class_scores(out, decoder_head_type, m2f_dtype)[..., :h, :w]
    if (h, w) != tuple(rescale_to):
        scores = F.interpolate(scores.float(), size=tuple(rescale_to), mode="bilinear", align_corners=False)
    return scores


def _model_device(model: nn.Module, default: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return default if param is None else param.device


def slide_crop_boxes(height: int, width: int, crop_size, stride) -> list[tuple[int, int, int, int]]:
    """Windows `(y1, y2, x1, x2)` of the official crop grid, row-major; the last row / column ends at the border.

    An image smaller than the crop in both dimensions gets square crops of its short side (the official rule);
    otherwise a crop larger than the image in one dimension spans that dimension. All windows have the same size.
    A stride larger than the crop it was given for would leave pixels uncovered, so it is an error; a stride larger
    than a crop shrunk to the image is reduced to that crop (same windows wherever the official grid covers the
    image, and no gaps where it does not).
    """
    h_crop, w_crop = to_pair(crop_size, "crop_size")
    h_stride, w_stride = to_pair(stride, "stride")
    if h_stride > h_crop or w_stride > w_crop:
        raise ValueError(
            f"stride {(h_stride, w_stride)} is larger than crop_size {(h_crop, w_crop)}: pixels would be skipped"
        )
    if h_crop > height and w_crop > width:
        h_crop = w_crop = min(height, width)
    h_crop, w_crop = min(h_crop, height), min(w_crop, width)
    h_stride, w_stride = min(h_stride, h_crop), min(w_stride, w_crop)
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for i in range(h_grids):
        y2 = min(i * h_stride + h_crop, height)
        y1 = max(y2 - h_crop, 0)
        for j in range(w_grids):
            x2 = min(j * w_stride + w_crop, width)
            x1 = max(x2 - w_crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def _first_cover_plan(boxes):
    """For row-major `slide_crop_boxes` windows: per window, the rectangle it is the first to cover and the
    rectangles (at most two) that earlier windows already covered, each as `(y1, y2, x1, x2)`.

    Earlier rows span the full width, so rows above `row_start` are seen; the previous window of the same row
    covers columns left of `col_start`. The first-cover rectangles partition the image.
    """
    plan = []
    row, row_start, prev_row_end, col_start = None, 0, 0, 0
    for y1, y2, x1, x2 in boxes:
        if (y1, y2) != row:
            prev_row_end = row[1] if row is not None else 0
            row, col_start = (y1, y2), 0
        row_start = max(y1, prev_row_end)
        new_x1 = max(x1, col_start)
        seen = [
            r for r in ((y1, row_start, x1, x2), (row_start, y2, x1, new_x1)) if r[0] < r[1] and r[2] < r[3]
        ]
        plan.append(((row_start, y2, new_x1, x2), seen))
        col_start = x2
    return plan


def _add_crop(pred: torch.Tensor, score: torch.Tensor, box, plan_entry, weight: torch.Tensor) -> None:
    """Add one crop's weighted scores [C, h, w] into its window of `pred` [C, H, W]: the part it is first
    to cover is written (the accumulator is not zero-filled), the rest is added to."""
    oy, ox = box[0], box[2]
    (y1, y2, x1, x2), seen = plan_entry
    torch.mul(score[:, y1 - oy : y2 - oy, x1 - ox : x2 - ox], weight[y1:y2, x1:x2], out=pred[:, y1:y2, x1:x2])
    for y1, y2, x1, x2 in seen:
        pred[:, y1:y2, x1:x2].addcmul_(score[:, y1 - oy : y2 - oy, x1 - ox : x2 - ox], weight[y1:y2, x1:x2])


@torch.no_grad()
def slide_inference(
    inputs: torch.Tensor,
    segmentation_model: nn.Module,
    decoder_head_type: str = "linear",
    n_output_channels: int | None = None,
    crop_size=(512, 512),
    stride=(341, 341),
    num_max_forward: int = 1,
    *,
    crop_batch_size: int = 8,
    out: torch.Tensor | None = None,
    buffer: AccumulatorBuffer | None = None,
) -> torch.Tensor:
    """Sliding-window class scores [B, C, H, W] (float32, on the model's device) for images [B, 3, H, W].

    Official arguments: `decoder_head_type` ("linear", or "m2f" for Mask2Former outputs, whose class scores are
    then rounded through bfloat16 as officially; Mask2Former outputs are also recognised under "linear", in
    float32); `n_output_channels` (C; None: the model's), `crop_size`, `stride` (`slide_crop_boxes`);
    `num_max_forward`: when larger than the number of model calls needed, extra calls on zero crops are made up to
    it (ranks of a sharded model must call it equally often).

    Each pixel gets the mean of the scores of the crops covering it. The crops of all images are batched
    `crop_batch_size` at a time.
    - `n_output_channels`, when given, lets the accumulator be allocated before the first model call
      (while the least memory is in use) instead of after it.
    - `out`: a float32 [B, C, H, W] tensor on the model's device to write the result into (its content is
      overwritten, not added to); reusing one across same-size images saves allocating and first-touching
      a fresh accumulator each time, which dominates the overhead on CPU.
    - `buffer`: an `AccumulatorBuffer` to take the accumulator from (the same saving for images of any size);
      the result is a view of it, valid until the buffer's next use.
    """
    head_type = _check_head_type(decoder_head_type)
    if inputs.ndim != 4:
        raise ValueError(f"slide_inference: expected images [B, C, H, W], got shape {tuple(inputs.shape)}")
    if crop_batch_size < 1:
        raise ValueError(f"crop_batch_size must be >= 1, got {crop_batch_size}")
    if out is not None and buffer is not None:
        raise ValueError("slide_inference: pass out or buffer, not both")
    device = _model_device(segmentation_model, inputs.device)
    inputs = inputs.to(device)
    batch_size, _, height, width = inputs.shape
    boxes = slide_crop_boxes(height, width, crop_size, stride)
    crop_hw = (boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2])
    plan = _first_cover_plan(boxes)
    multiple = _input_multiple(segmentation_model)

    # Every pixel's weight is 1 / (number of crops covering it), so the accumulated sum is already the mean.
    count = torch.zeros(height, width, device=device, dtype=torch.float32)
    for y1, y2, x1, x2 in boxes:
        count[y1:y2, x1:x2] += 1
    weight = count.reciprocal_()

    def accumulator(channels: int) -> torch.Tensor:
        shape = (batch_size, channels, height, width)
        if buffer is not None:
            return buffer.get(shape, device)
        if out is None:
            # No zero fill: the first crop covering a pixel writes it (see `_first_cover_plan`).
            return torch.empty(shape, device=device, dtype=torch.float32)
        if tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != device:
            raise ValueError(
                f"slide_inference: out must be float32 {list(shape)} on {device}, "
                f"got {out.dtype} {list(out.shape)} on {out.device}"
            )
        return out

    preds = accumulator(n_output_channels) if n_output_channels is not None else None
    jobs = [(b, i) for b in range(batch_size) for i in range(len(boxes))]
    n_calls = 0
    for start in range(0, len(jobs), crop_batch_size):
        chunk = jobs[start : start + crop_batch_size]
        crops = torch.stack(
            [inputs[b, :, y1:y2, x1:x2] for b, (y1, y2, x1, x2) in ((b, boxes[i]) for b, i in chunk)]
        )
        scores = _predict_scores(segmentation_model, crops, crop_hw, multiple, head_type, torch.bfloat16)
        n_calls += 1
        if preds is None:
            preds = accumulator(scores.shape[1])
        elif scores.shape[1] != preds.shape[1]:
            raise ValueError(
                f"slide_inference: model returned {scores.shape[1]} channels, expected {preds.shape[1]}"
            )
        for j, (b, i) in enumerate(chunk):
            _add_crop(preds[b], scores[j], boxes[i], plan[i], weight)
        del crops, scores  # before the next model call: they hold a whole batch of full-resolution scores
    padded_hw = tuple(s + -s % multiple for s in crop_hw)
    for _ in range(n_calls, num_max_forward):
        dummy = inputs.new_zeros(min(crop_batch_size, len(jobs)), inputs.shape[1], *padded_hw)
        segmentation_model.predict(dummy, rescale_to=padded_hw)
    return preds


@torch.no_grad()
def make_inference(
    x: torch.Tensor,
    segmentation_model: nn.Module,
    inference_mode: str = "whole",
    decoder_head_type: str = "linear",
    rescale_to=(512, 512),
    n_output_channels: int | None = None,
    crop_size=None,
    stride=None,
    apply_horizontal_flip: bool = False,
    num_max_forward: int = 1,
    output_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    crop_batch_size: int = 8,
    buffer: AccumulatorBuffer | None = None,
) -> torch.Tensor:
    """Class scores [B, C, *rescale_to] for images x [B, 3, H, W] (official arguments and order).

    "whole": one prediction on x resized to `crop_size` (None: 512 x 512, as officially).
    "slide": `slide_inference` with `decoder_head_type`, `n_output_channels`, `crop_size`, `stride` and
    `num_max_forward`, then a bilinear resize to `rescale_to`.
    `apply_horizontal_flip` flips the prediction back (x is the flipped image); `output_activation` (e.g.
    softmax over dim 1) is applied last. `crop_batch_size` and `buffer` are passed to `slide_inference`: without
    a resize, flip or activation the result is a view of the buffer.
    """
    head_type = _check_head_type(decoder_head_type)
    rescale_to = to_pair(rescale_to, "rescale_to")
    if inference_mode == "slide":
        if crop_size is None or stride is None:
            raise ValueError("make_inference(inference_mode='slide') needs crop_size and stride")
        pred = slide_inference(
            x,
            segmentation_model,
            head_type,
            n_output_channels,
            crop_size,
            stride,
            num_max_forward,
            crop_batch_size=crop_batch_size,
            buffer=buffer,
        )
        if pred.shape[-2:] != rescale_to:
            pred = F.interpolate(pred, size=rescale_to, mode="bilinear", align_corners=False)
    elif inference_mode == "whole":
        x = x.to(_model_device(segmentation_model, x.device))
        size = to_pair(crop_size if crop_size is not None else 512, "crop_size")
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        multiple = _input_multiple(segmentation_model)
        pred = _predict_scores(segmentation_model, x, rescale_to, multiple, head_type, torch.float32).float()
    else:
        raise ValueError(f"unknown inference_mode {inference_mode!r}; expected 'whole' or 'slide'")
    if apply_horizontal_flip:
        pred = pred.flip(-1)
    if output_activation is not None:
        pred = output_activation(pred)
    return pred


def tta_image_size(height: int, width: int, small_size: int, ratio: float) -> tuple[int, int]:
    """Official TTA scale rule: short side `int(small_size * ratio)`, rounded up to a multiple of 32 for ratios
    below 1; long side keeps the aspect ratio (rounded to nearest)."""
    if ratio <= 0 or small_size <= 0:
        raise ValueError(
            f"tta ratio and small_size must be positive, got ratio={ratio}, small_size={small_size}"
        )
    side = int(small_size * ratio)
    if ratio < 1:
        side = -(-side // 32) * 32
    if height > width:
        return int(side * height / width + 0.5), side
    return side, int(side * width / height + 0.5)


@torch.no_grad()
def make_tta_inference(
    x: torch.Tensor,
    segmentation_model: nn.Module,
    rescale_to,
    tta_ratios: Sequence[float] = (1.0,),
    use_flip: bool = False,
    small_size: int | None = None,
    inference_mode: str = "whole",
    crop_size=(512, 512),
    stride=(341, 341),
    crop_batch_size: int = 8,
    n_output_channels: int | None = None,
    output_activation: Callable[[torch.Tensor], torch.Tensor] | None = _SOFTMAX,
    buffer: AccumulatorBuffer | None = None,
    decoder_head_type: str = "linear",
) -> torch.Tensor:
    """Mean over scales (and horizontal flips) of the activated predictions, [B, C, *rescale_to] float32.

    x is the image at its original resolution; each scale is resized from it with `tta_image_size(small_size,
    ratio)` (`small_size=None`: x's own short side) when it is needed, so only one scaled copy exists at a time.
    With `tta_ratios=(1.0,)` and no flip this is the plain (non-TTA) evaluation. In whole-image mode without a
    `crop_size`, each scale is predicted at its own size rounded up to the patch grid. `buffer` holds the
    sliding-window accumulator of every prediction (see `AccumulatorBuffer`).
    """
    if x.ndim != 4:
        raise ValueError(f"make_tta_inference: expected images [B, C, H, W], got shape {tuple(x.shape)}")
    if not tta_ratios:
        raise ValueError("make_tta_inference: tta_ratios is empty")
    height, width = x.shape[-2:]
    small_size = min(height, width) if small_size is None else small_size
    total = None
    n_preds = 0
    for ratio in tta_ratios:
        size = tta_image_size(height, width, small_size, ratio)
        scaled = (
            x if size == (height, width) else F.interpolate(x, size=size, mode="bilinear", antialias=True)
        )
        own_size = inference_mode == "whole" and crop_size is None
        for flip in (False, True) if use_flip else (False,):
            pred = make_inference(
                scaled.flip(-1) if flip else scaled,
                segmentation_model,
                inference_mode,
                decoder_head_type,
                rescale_to=rescale_to,
                n_output_channels=n_output_channels,
                crop_size=whole_image_size(scaled, segmentation_model) if own_size else crop_size,
                stride=stride,
                apply_horizontal_flip=flip,
                output_activation=output_activation,
                crop_batch_size=crop_batch_size,
                buffer=buffer,
            )
            if total is None:
                # Later predictions reuse the buffer: a sum that is a view of it must move out first.
                more = len(tta_ratios) > 1 or use_flip
                total = pred.clone() if more and buffer is not None and buffer.holds(pred) else pred
            else:
                total.add_(pred)
            # Drop it before the next prediction: it is as large as the sum (612 MiB for 150 classes at 896 x 1195).
            del pred
            n_preds += 1
        del scaled
    return total.div_(n_preds)


@dataclass(frozen=True)
class InferenceSettings:
    """How evaluation and prediction turn an image into class probabilities; built once per run."""

    mode: InferenceMode = InferenceMode.SLIDE
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    crop_batch_size: int = 8
    tta_ratios: tuple[float, ...] = (1.0,)  # scales of the short side; with use_flip: test-time augmentation
    use_flip: bool = False
    # The short side the scales are taken of, from the image at its original size (the official TTA); None:
    # the given image's own short side.
    small_size: int | None = None
    decoder_head_type: str = "linear"  # "m2f": Mask2Former class scores rounded as officially (see slide_inference)
    # Whole-image mode: the size every image is resized to (a model exported for one input size); None: each
    # image's own size rounded up to the backbone's patch grid.
    whole_size: tuple[int, int] | None = None

    def __call__(self, image: torch.Tensor, segmentation_model: nn.Module, rescale_to,
                 buffer: AccumulatorBuffer | None = None) -> torch.Tensor:
        """Softmax probabilities [B, C, *rescale_to] of `image` [B, 3, H, W] (the eval transform's output)."""
        whole = self.mode is InferenceMode.WHOLE
        return make_tta_inference(
            image, segmentation_model, rescale_to=rescale_to, tta_ratios=self.tta_ratios, use_flip=self.use_flip,
            small_size=self.small_size, inference_mode=self.mode.value, crop_size=self.whole_size if whole else self.crop_size,
            stride=self.stride, crop_batch_size=self.crop_batch_size, buffer=buffer,
            decoder_head_type=self.decoder_head_type,
        )
