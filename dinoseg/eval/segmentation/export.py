"""The segmentation part of ONNX export: a trained segmentor as one file, frozen backbone + trained head,
normalised images in, class scores at the input resolution out, with everything a consumer needs to preprocess
and colour in its metadata. The generic part (tracing, verification, the atomic write, the fallback to a fixed
size) is `dinoseg.engine.export`.

    export_onnx(segmentor, "segmentor.onnx", metadata=deployment_metadata(...))
    dinoseg export CONFIG head=PATH -o segmentor.onnx [--size H W] [--opset N]

Sizes stay symbolic in the graph: with a dynamic spatial size the patch grid, the RoPE coordinates and
(Mask2Former) the adapter padding, deformable-attention levels and reference points are computed from the input
shape inside the graph. Mask2Former's multi-scale deformable attention is exported through its `grid_sample`
implementation (ONNX `GridSample`); the `gather` one (`embedding_bag`) has no ONNX form. Both give the same
numbers. A dynamic size that cannot be made exact falls back to the slide crop, with a warning.

Graph (float32 throughout, whatever the training precision):
- input `image` [B, 3, H, W]: normalised as the metadata says; H, W multiples of `size_multiple` (the ViT's patch
  size; 1 on a ConvNeXt without pseudo patch size, from 32 pixels) when dynamic, or exactly `input_size`.
- output `class_scores` [B, C, H, W]: linear head logits, or Mask2Former semantic scores (softmax class
  probabilities x sigmoid masks, summed over queries); the argmax over C is the segmentation.
- the head outputs before their final resize, so `OnnxSegmentor.predict` can resize to any size exactly as the
  PyTorch head does: `patch_logits` [B, C, h, w] (linear, on the head's grid) or `pred_logits` [B, Q, C+1] and
  `pred_masks` [B, Q, H/4, W/4] (Mask2Former).
"""

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine.export import DEFAULT_OPSET, ExportError, check_exportable, check_torch_version, write_onnx
from .inference import mask_classification_to_semantic
from .models import FeatureDecoder
from .models.heads.linear_head import LinearHead
from .models.heads.mask2former_head import Mask2FormerHead
from .models.utils.ms_deform_attn import MSDeformAttn

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "deployment_metadata",
    "export_onnx",
]

logger = logging.getLogger("dinoseg")

FORMAT = "dinoseg-segmentor/1"
SCORES = "class_scores"
HEAD_OUTPUTS = {"linear": ("patch_logits",), "m2f": ("pred_logits", "pred_masks")}
# Metadata the runtime needs (the rest of `deployment_metadata`), besides what `export_onnx` adds itself.
REQUIRED_METADATA = ("mean", "std", "resize_short_side", "inference_mode", "crop_size", "stride", "tta_ratios",
                     "flip", "class_names", "palette")
# The smallest side of a dynamic graph: a ConvNeXt's last stage has stride 32, the ViT-Adapter pads to 32.
MIN_SIDE = 32
METADATA_DOC = """dinoseg segmentor. Every metadata value is JSON.
Preprocessing: RGB image -> float in [0, 1] -> if resize_short_side is not null, bilinear antialiased resize so the
short side is resize_short_side (other side int(side * scale + 0.5)) -> (x - mean) / std per channel.
Inference: "whole": resize to a multiple of patch_size (rounded up; 32 when null; exactly input_size for a fixed
graph) and run once; "slide": crop_size x crop_size windows every stride pixels, the last row/column aligned to the
border, scores averaged where windows overlap. Input sides must be multiples of size_multiple. Scores are resized
(bilinear) to the image size; argmax over classes is the mask; tta_ratios / flip: the scales (short side x ratio)
and horizontal flip averaged after a softmax.
Output class_scores [B, num_classes, H, W] at the input resolution. class_names and palette (RGB) index the classes."""


# -- metadata --------------------------------------------------------------------------------------------------


def deployment_metadata(
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    resize_short_side: int | None = 512,
    inference_mode: str = "slide",
    crop_size: int = 512,
    stride: int = 341,
    tta_ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Preprocessing, inference and class settings for the ONNX metadata (defaults: the official ADE20K eval).

    Means / stds in the 0-255 range are converted to [0, 1] as `Normalize` does; `palette` entries are RGB."""
    from .transforms import Normalize  # torchvision: imported when exporting, not with the task's code

    normalize = Normalize(mean, std)
    if inference_mode not in ("whole", "slide"):
        raise ExportError(f"inference_mode {inference_mode!r}: expected 'whole' or 'slide'")
    if crop_size <= 0 or not 0 < stride <= crop_size:
        raise ExportError(f"crop_size={crop_size}, stride={stride}: need 0 < stride <= crop_size")
    if not tta_ratios or min(tta_ratios) <= 0:
        raise ExportError(f"tta_ratios {list(tta_ratios)}: need at least one positive ratio")
    if palette is not None and any(len(c) != 3 or not all(0 <= int(v) <= 255 for v in c) for c in palette):
        raise ExportError("palette: every entry must be 3 integers in [0, 255] (RGB)")
    return {
        "mean": normalize.mean,
        "std": normalize.std,
        "resize_short_side": None if resize_short_side is None else int(resize_short_side),
        "inference_mode": inference_mode,
        "crop_size": int(crop_size),
        "stride": int(stride),
        "tta_ratios": [float(r) for r in tta_ratios],
        "flip": bool(flip),
        "class_names": None if class_names is None else [str(n) for n in class_names],
        "palette": None if palette is None else [[int(v) for v in c] for c in palette],
    }


# -- the exported module ---------------------------------------------------------------------------------------


def _decoder_type(segmentor: nn.Module) -> str:
    if not isinstance(segmentor, FeatureDecoder):
        raise ExportError(
            f"export_onnx: expected a segmentor built by build_segmentation_decoder (FeatureDecoder), "
            f"got {type(segmentor).__name__}"
        )
    head = segmentor.segmentation_model[1]
    if isinstance(head, LinearHead):
        return "linear"
    if isinstance(head, Mask2FormerHead):
        return "m2f"
    raise ExportError(f"export_onnx: no ONNX export for the head {type(head).__name__}")


class _DeployedSegmentor(nn.Module):
    """`image -> (class scores at the image size, head outputs before their final resize)`; the class scores are
    those of `segmentor.predict(image, rescale_to=image size)`."""

    def __init__(self, segmentor: FeatureDecoder, decoder: str):
        super().__init__()
        self.backbone_side, self.head = segmentor.segmentation_model
        self.decoder = decoder

    def forward(self, image: torch.Tensor):
        size = image.shape[-2:]
        features = self.backbone_side(image)
        if self.decoder == "linear":
            # The logits on the head's own grid (the patch grid, or a ConvNeXt stage's), then predict's resize.
            patch_logits = self.head(features)  # eval mode: no dropout
            return F.interpolate(patch_logits, size=size, mode="bilinear"), patch_logits
        out = self.head(features)  # Mask2Former's predict, written out to also return the stride-4 masks
        masks = F.interpolate(out["pred_masks"], size=size, mode="bilinear", align_corners=False)
        return mask_classification_to_semantic(out["pred_logits"], masks), out["pred_logits"], out["pred_masks"]


def _patch_size(segmentor: FeatureDecoder) -> int | None:
    """The backbone's patch size: a ViT's, a ConvNeXt's pseudo patch size, or None (a ConvNeXt's stage grids)."""
    patch = getattr(segmentor.segmentation_model[0], "patch_size", None)
    return patch if isinstance(patch, int) and not isinstance(patch, bool) else None


@contextlib.contextmanager
def _export_mode(segmentor: FeatureDecoder):
    """Float32, eval mode, and the `grid_sample` deformable attention (ONNX GridSample) while exporting."""
    attns = [m for m in segmentor.modules() if isinstance(m, MSDeformAttn)]
    saved = segmentor.training, segmentor.autocast_dtype, [m.impl for m in attns]
    segmentor.eval()
    segmentor.autocast_dtype = torch.float32
    for m in attns:
        m.impl = "grid_sample"
    try:
        yield
    finally:
        segmentor.train(saved[0])
        segmentor.autocast_dtype = saved[1]
        for m, impl in zip(attns, saved[2]):
            m.impl = impl


# -- export ----------------------------------------------------------------------------------------------------


# The oldest torch whose exporter handles each head (tested): older ones fail inside torch.export (a linear head's
# batch size is specialised before 2.8; Mask2Former's graph fails before 2.12).
MIN_TORCH = {"linear": "2.8", "m2f": "2.12"}
HEAD_NAMES = {"linear": "a linear head", "m2f": "a Mask2Former head"}


def export_onnx(
    segmentor: FeatureDecoder,
    path: str | Path,
    *,
    image_size: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: dict | None = None,
) -> Path:
    """Write `segmentor` (backbone + head, float32) as one verified ONNX graph at `path`; returns `path`.

    Args:
        segmentor: a `build_segmentation_decoder` model (linear or Mask2Former head, on a ViT or a ConvNeXt), on
            the CPU.
        path: the .onnx file to write (replaced only once the new one is verified).
        image_size: None for a dynamic spatial size (multiples of the patch size; any size from 32 pixels on a
            ConvNeXt without pseudo patch size), or a fixed (H, W).
        opset: ONNX opset (>= 18).
        metadata: `deployment_metadata(...)` (default: its defaults), stored in `metadata_props` as JSON values,
            together with `format`, `task`, `decoder`, `num_classes`, `patch_size`, `size_multiple`, `input_size`
            ("dynamic" or [H, W]), `outputs` and `opset`.
    The batch size is always dynamic.
    """
    decoder = _decoder_type(segmentor)
    check_torch_version(MIN_TORCH[decoder], HEAD_NAMES[decoder])
    check_exportable(segmentor, "export_onnx")
    metadata = dict(deployment_metadata() if metadata is None else metadata)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ExportError(f"export_onnx: metadata lacks {missing}; build it with deployment_metadata()")
    patch = _patch_size(segmentor)
    multiple = patch or 1
    crop = (metadata["crop_size"],) * 2
    if image_size is not None:
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) <= 0 or any(s % multiple for s in image_size):
            raise ExportError(f"image_size {list(image_size)}: need two positive multiples of the patch size {multiple}")
        if metadata["inference_mode"] == "slide" and image_size != crop:
            raise ExportError(f"image_size {list(image_size)}: a fixed-size graph for slide inference must take the "
                              f"{crop[0]} x {crop[1]} crops (crop_size)")
    head = segmentor.segmentation_model[1]
    num_classes = head.num_classes if decoder == "m2f" else head.n_output_channels
    for key in ("class_names", "palette"):
        if metadata[key] is not None and len(metadata[key]) != num_classes:
            raise ExportError(f"metadata {key} has {len(metadata[key])} entries; the segmentor has {num_classes} classes")
    metadata.update(format=FORMAT, task="segmentation", decoder=decoder, num_classes=num_classes, patch_size=patch,
                    size_multiple=multiple)
    fallback = crop if crop[0] % multiple == 0 else None
    with _export_mode(segmentor):
        module = _DeployedSegmentor(segmentor, decoder).eval()
        report = write_onnx(module, path, outputs=[SCORES, *HEAD_OUTPUTS[decoder]], metadata=metadata,
                            size_multiple=multiple, min_size=MIN_SIDE, image_size=image_size, fallback_size=fallback,
                            opset=opset, doc=METADATA_DOC, what="the segmentor")
    return report.path

