"""The detection part of ONNX export: a trained detector (frozen backbone + Plain-DETR head) as one file, normalised
images and their padding mask in, the one-to-one queries' class logits and boxes out, with the preprocessing, the
post-processing settings and the categories in its metadata. The generic part (tracing, verification against
PyTorch, the atomic write) is `dinoseg.engine.export`.

    export_onnx(detector, "detector.onnx", image_size=(1344, 1344), metadata=deployment_metadata(...))
    dinoseg export detection_config.yaml head=PATH -o detector.onnx [--size H W] [--opset N]

The graph has a fixed spatial size, the canvas (the batch size is dynamic): the two-stage proposals are one per
cell of the feature maps, and torch.export bakes their number at the traced size into the graph (a dynamic-size
graph traces, but fails at any other size). Images keep their aspect ratio as in a padded PyTorch batch: each is
resized by the eval transform's rule (short side `eval_size`, long side at most `eval_max_size`), scaled down
further where it does not fit the canvas (`transforms.fitted_size`), and padded at the bottom and right, the mask
marking the padding. The default canvas is the largest side the eval transform gives (`transforms.eval.max_size`,
else `transforms.eval.size`) square, rounded up to the patch size.

Graph (float32 throughout, whatever the training precision):
- inputs `image` [B, 3, H, W]: normalised as the metadata says, exactly `input_size`, zero in the padding; and
  `mask` [B, H, W] (bool, True on padding): the detector's `NestedTensor`.
- outputs `pred_logits` [B, Q, C] (per-class logits: sigmoid scores) and `pred_boxes` [B, Q, 4] (cx, cy, w, h,
  normalised to the image, or in its pixels when `reparam`) of the Q one-to-one queries: what the detector returns
  in eval mode. `PostProcess(topk, reparam)` turns them into scored boxes (`OnnxDetector.postprocess`).
"""

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine.export import DEFAULT_OPSET, ExportError, check_exportable, check_torch_version, write_onnx
from .models.detr import PlainDETR, PlainDETRReParam
from .transforms import EVAL_SIZE, MAX_SIZE, _unit_range
from .util.misc import NestedTensor

__all__ = ["DEFAULT_OPSET", "FORMAT", "ExportError", "deployment_metadata", "export_onnx"]

FORMAT = "dinoseg-detector/2"  # /1: no mask input, images stretched to the graph's size
INPUTS = ("image", "mask")
OUTPUTS = ("pred_logits", "pred_boxes")
# Metadata the runtime needs (the rest of `deployment_metadata`), besides what `export_onnx` adds itself.
REQUIRED_METADATA = ("mean", "std", "eval_size", "eval_max_size", "topk", "score_threshold", "category_ids",
                     "category_names", "colours")
# The oldest torch the export extra allows (tested with 2.14).
MIN_TORCH = "2.12"
METADATA_DOC = """dinoseg detector. Every metadata value is JSON.
Preprocessing: RGB image -> float in [0, 1] -> bilinear antialiased resize keeping the aspect ratio: short side
eval_size, long side at most eval_max_size (null: no limit), then scaled down to fit in input_size [H, W] if it does
not -> (x - mean) / std per channel -> padded with zeros at the bottom and right to input_size; input mask [B, H, W]
is true on the padding. Outputs of the one-to-one queries: pred_logits [B, Q, C] (sigmoid: the score of each class)
and pred_boxes [B, Q, 4] (cx, cy, w, h; normalised to the resized image when reparam is false, in its pixels when
true). Detections: the topk (query, class) pairs by score; boxes to XYXY, clipped to the resized image and scaled
to the original image (per axis).
Label k is category category_ids[k] named category_names[k] (null: a label of no category); colours are RGB."""


def deployment_metadata(
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    size: int = EVAL_SIZE,
    max_size: int | None = MAX_SIZE,
    topk: int = 100,
    score_threshold: float = 0.3,
    category_ids: Sequence[int | None] = (),
    category_names: Sequence[str | None] = (),
    colours: Sequence[Sequence[int]] = (),
) -> dict:
    """Preprocessing, post-processing and categories for the ONNX metadata, as `dinoseg predict` runs a detector.
    `size` / `max_size`: the eval transform's short side and long-side limit (`transforms.eval`).
    `category_ids[k]` / `category_names[k]` / `colours[k]`: the dataset's category of label k (None where a label
    is no category, e.g. the unused ids of a 91-class COCO head)."""
    if not (len(category_ids) == len(category_names) == len(colours)):
        raise ExportError(f"deployment_metadata: {len(category_ids)} category ids, {len(category_names)} names and "
                          f"{len(colours)} colours; expected one of each per label")
    if not 0 <= score_threshold <= 1 or topk < 1:
        raise ExportError(f"deployment_metadata: topk {topk} must be >= 1 and score_threshold {score_threshold} in [0, 1]")
    if size < 1 or (max_size is not None and max_size < size):
        raise ExportError(f"deployment_metadata: size {size} must be >= 1 and max_size {max_size} null or >= size")
    return {
        "mean": _unit_range(mean, "mean"),
        "std": _unit_range(std, "std"),
        "eval_size": int(size),
        "eval_max_size": None if max_size is None else int(max_size),
        "topk": int(topk),
        "score_threshold": float(score_threshold),
        "category_ids": [None if c is None else int(c) for c in category_ids],
        "category_names": [None if n is None else str(n) for n in category_names],
        "colours": [[int(v) for v in c] for c in colours],
    }


class _DeployedDetector(nn.Module):
    """`(image, mask) -> (pred_logits, pred_boxes)`: the detector's eval-mode outputs (the one-to-one queries) on
    the padded batch `NestedTensor(image, mask)`."""

    def __init__(self, detector: PlainDETR):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor, mask: torch.Tensor):
        outputs = self.detector(NestedTensor(image, mask))
        return tuple(outputs[name] for name in OUTPUTS)


def _sample_mask(images: torch.Tensor, index: int) -> torch.Tensor:
    """A padding mask for tracing and verifying: the last image of the batch padded at the bottom and right (a
    landscape image on the first sample, a portrait one on the second), the others not."""
    batch, _, height, width = images.shape
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if index == 0:
        mask[-1, height - height // 3:] = True
    else:
        mask[-1, :, width - width // 3:] = True
    return mask


@contextlib.contextmanager
def _eval_mode(detector: nn.Module):
    saved = detector.training
    detector.eval()
    try:
        yield
    finally:
        detector.train(saved)


def export_onnx(
    detector: PlainDETR,
    path: str | Path,
    *,
    image_size: Sequence[int],
    opset: int = DEFAULT_OPSET,
    metadata: dict | None = None,
) -> Path:
    """Write `detector` (backbone + head, float32, on the CPU) as one verified ONNX graph at `path`; returns `path`.

    Args:
        detector: a `PlainDETR` / `PlainDETRReParam` (`build_model`).
        path: the .onnx file to write (replaced only once the new one is verified).
        image_size: the graph's fixed (H, W), multiples of the patch size.
        opset: ONNX opset (>= 18).
        metadata: `deployment_metadata(...)` (one entry per label), stored in `metadata_props` as JSON values with
            `format`, `task`, `reparam`, `num_classes`, `patch_size`, `size_multiple`, `inputs`, `input_size`,
            `outputs`, `opset`.
    """
    if not isinstance(detector, PlainDETR):
        raise ExportError(f"export_onnx: expected a PlainDETR detector (build_model), got {type(detector).__name__}")
    check_torch_version(MIN_TORCH, "a detector")
    check_exportable(detector, "export_onnx")
    num_classes = detector.class_embed[0].out_features
    metadata = dict(deployment_metadata(category_ids=[None] * num_classes, category_names=[None] * num_classes,
                                        colours=[[200, 200, 200]] * num_classes) if metadata is None else metadata)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ExportError(f"export_onnx: metadata lacks {missing}; build it with deployment_metadata()")
    if len(metadata["category_ids"]) != num_classes:
        raise ExportError(f"export_onnx: the metadata names {len(metadata['category_ids'])} labels, the detector "
                          f"predicts {num_classes}")
    patch = detector.backbone.strides[0]
    size = [int(s) for s in image_size]
    if len(size) != 2 or min(size) <= 0 or any(s % patch for s in size):
        raise ExportError(f"image size {image_size}: expected [H, W], multiples of the patch size {patch}")
    metadata.update(format=FORMAT, task="detection", reparam=isinstance(detector, PlainDETRReParam),
                    num_classes=num_classes, patch_size=patch, size_multiple=patch, inputs=list(INPUTS))
    with _eval_mode(detector):
        report = write_onnx(_DeployedDetector(detector), path, outputs=list(OUTPUTS), metadata=metadata,
                            size_multiple=patch, image_size=size, opset=opset, doc=METADATA_DOC, what="the detector",
                            extra_inputs={INPUTS[1]: _sample_mask})
    return report.path
