"""The depth part of ONNX export: a trained depther (frozen backbone + linear or DPT head) as one file, normalised
images in, depth in metres out, with the preprocessing in its metadata. The generic part (tracing, verification,
the atomic write, the fallback to a fixed size) is `dinoseg.engine.export`.

    export_onnx(depther, "depther.onnx", metadata=deployment_metadata(...))
    dinoseg export depth_config.yaml head=PATH -o depther.onnx [--size H W] [--opset N]

Graph (float32 throughout, whatever the training precision):
- input `image` [B, 3, H, W]: normalised as the metadata says; any size when dynamic (the patch-size adaptation,
  e.g. centre padding, is inside the graph), or exactly `input_size`.
- output `depth` [B, 1, h, w]: metres, at the head's resolution (the patch grid for a linear head, 16 pixels per
  patch for DPT), what `Depther.forward` returns; `dinoseg predict --onnx` flips (TTA) and resizes it to the image
  as `dinoseg predict` does.
"""

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine.export import DEFAULT_OPSET, ExportError, check_exportable, check_torch_version, write_onnx
from .models import Depther

__all__ = ["DEFAULT_OPSET", "ExportError", "deployment_metadata", "export_onnx"]

FORMAT = "dinoseg-depther/1"
DEPTH = "depth"
REQUIRED_METADATA = ("mean", "std", "img_size", "flip")
# The oldest torch tested with these heads (the export extra's floor).
MIN_TORCH = "2.12"
METADATA_DOC = """dinoseg depther. Every metadata value is JSON.
Preprocessing: RGB image -> float in [0, 1] -> if img_size is an int, bilinear antialiased resize so the short side
is img_size; if [H, W], resize to it; if null, keep the size -> (x - mean) / std per channel.
Output depth [B, 1, h, w] in metres at the head's resolution: resize it (bilinear) to the image. flip: average the
prediction of the horizontally flipped image, flipped back, before resizing (test-time augmentation).
min_depth / max_depth: the range of the head's depth bins."""


def deployment_metadata(
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    img_size: int | Sequence[int] | None = None,
    flip: bool = False,
) -> dict:
    """Preprocessing and test-time augmentation for the ONNX metadata (as `dinoseg predict` runs a depther).

    `img_size`: None keeps the image size, an int is the shorter side, [H, W] a fixed size."""
    from .transforms import Normalize  # torchvision: imported when exporting, not with the task's code

    normalize = Normalize(mean, std)
    if img_size is not None and not isinstance(img_size, int):
        img_size = [int(s) for s in img_size]
        if len(img_size) != 2 or min(img_size) <= 0:
            raise ExportError(f"img_size {img_size}: expected null, an int or two positive ints [H, W]")
    elif isinstance(img_size, int) and img_size <= 0:
        raise ExportError(f"img_size {img_size}: must be positive")
    return {
        "mean": normalize.mean,
        "std": normalize.std,
        "img_size": img_size,
        "flip": bool(flip),
    }


class _DeployedDepther(nn.Module):
    """`image -> (depth,)`: `Depther.forward`, as a one-output tuple."""

    def __init__(self, depther: Depther):
        super().__init__()
        self.depther = depther

    def forward(self, image: torch.Tensor):
        return (self.depther(image),)


@contextlib.contextmanager
def _export_mode(depther: Depther):
    """Eval mode and float32 compute while exporting; the depther keeps its own settings afterwards."""
    saved = depther.training, depther.autocast_dtype
    depther.eval()
    depther.autocast_dtype = torch.float32
    try:
        yield
    finally:
        depther.train(saved[0])
        depther.autocast_dtype = saved[1]


def export_onnx(
    depther: Depther,
    path: str | Path,
    *,
    image_size: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: dict | None = None,
) -> Path:
    """Write `depther` (backbone + head, float32) as one verified ONNX graph at `path`; returns `path`.

    Args:
        depther: a `Depther` (`make_depther_from_config`, `build_depther`), on the CPU.
        path: the .onnx file to write (replaced only once the new one is verified).
        image_size: None for a dynamic spatial size (any size), or a fixed (H, W), which must then be the
            preprocessing's `img_size`.
        opset: ONNX opset (>= 18).
        metadata: `deployment_metadata(...)` (default: its defaults), stored in `metadata_props` as JSON values,
            together with `format`, `task`, `head`, `min_depth` / `max_depth` (the depther's bin range),
            `size_multiple`, `input_size`, `outputs` and `opset`.
    The batch size is always dynamic. Without a fixed size, a dynamic size that cannot be made exact falls back
    to `img_size` when it is [H, W], else fails.
    """
    if not isinstance(depther, Depther):
        raise ExportError(f"export_onnx: expected a Depther (make_depther_from_config), got {type(depther).__name__}")
    check_torch_version(MIN_TORCH, "a depther")
    check_exportable(depther, "export_onnx")
    metadata = dict(deployment_metadata() if metadata is None else metadata)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ExportError(f"export_onnx: metadata lacks {missing}; build it with deployment_metadata()")
    fixed = metadata["img_size"] if isinstance(metadata["img_size"], list) else None
    if image_size is not None:
        image_size = [int(s) for s in image_size]
        if image_size != fixed:
            raise ExportError(f"image_size {image_size}: a fixed-size graph must take the images the preprocessing "
                              f"gives; set img_size (transforms.eval.img_size) to {image_size}")
    head = type(depther.decoder).__name__
    bins = depther.features_to_depth
    metadata.update(format=FORMAT, task="depth", head=head, min_depth=bins.min_depth, max_depth=bins.max_depth,
                    size_multiple=1)
    with _export_mode(depther):
        report = write_onnx(_DeployedDepther(depther), path, outputs=[DEPTH], metadata=metadata, size_multiple=1,
                            min_size=depther.encoder.patch_size_adapter.multiple, image_size=image_size,
                            fallback_size=fixed, opset=opset, doc=METADATA_DOC, what="the depther")
    return report.path
