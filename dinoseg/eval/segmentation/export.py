"""Deploy a trained segmentor as one ONNX file: frozen backbone + trained head, normalised images in, class scores
at the input resolution out, with everything a consumer needs to preprocess and colour in its metadata.

    export_onnx(segmentor, "segmentor.onnx", metadata=metadata_from_config(cfg))
    dinoseg export CONFIG head=PATH -o segmentor.onnx [--size H W] [--opset N]

The graph is traced with torch.export (`torch.onnx.export(dynamo=True)`), so sizes stay symbolic: with a dynamic
spatial size the patch grid, the RoPE coordinates and (Mask2Former) the adapter padding, deformable-attention
levels and reference points are computed from the input shape inside the graph. Mask2Former's multi-scale
deformable attention is exported through its `grid_sample` implementation (ONNX `GridSample`); the `gather` one
(`embedding_bag`) has no ONNX form. Both give the same numbers.

Nothing is written unless it is right: the file is built in a temporary folder beside `path`, checked with
`onnx.checker`, run by onnxruntime on sample images (two sizes and batch sizes when the size is dynamic) and
compared with PyTorch, then renamed into place. A dynamic size that does not reproduce PyTorch at a second size
falls back to a fixed size (the slide crop) with a warning.

Graph (float32 throughout, whatever the training precision):
- input `image` [B, 3, H, W]: normalised as the metadata says; H, W multiples of `size_multiple` (dynamic) or
  exactly `input_size` (fixed).
- output `class_scores` [B, C, H, W]: linear head logits, or Mask2Former semantic scores (softmax class
  probabilities x sigmoid masks, summed over queries); the argmax over C is the segmentation.
- the head outputs before their final resize, so `OnnxSegmentor.predict` can resize to any size exactly as the
  PyTorch head does: `patch_logits` [B, C, H/p, W/p] (linear) or `pred_logits` [B, Q, C+1] and `pred_masks`
  [B, Q, H/4, W/4] (Mask2Former).
"""

import contextlib
import importlib
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from .inference import mask_classification_to_semantic
from .models import FeatureDecoder
from .models.heads.linear_head import LinearHead
from .models.heads.mask2former_head import Mask2FormerHead
from .models.utils.ms_deform_attn import MSDeformAttn
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Normalize

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "deployment_metadata",
    "export_onnx",
]

logger = logging.getLogger("dinoseg")

INSTALL_HINT = "pip install 'dinoseg[export]'"
# torch's ONNX exporter writes opset 18 and later: its down-conversion to 17 gives invalid graphs (e.g. `Split`
# keeps its opset-18 `num_outputs` attribute).
MIN_OPSET = 18
DEFAULT_OPSET = 18
FORMAT = "dinoseg-segmentor/1"
INPUT = "image"
SCORES = "class_scores"
HEAD_OUTPUTS = {"linear": ("patch_logits",), "m2f": ("pred_logits", "pred_masks")}
# Structural export errors (a wrong size rule, a constant that should follow the input) show as differences of
# the order of the outputs; float32 reordering in a deep backbone stays far below this fraction of their scale.
VERIFY_TOLERANCE = 1e-3
# Metadata the runtime needs (the rest of `deployment_metadata`), besides what `export_onnx` adds itself.
REQUIRED_METADATA = ("mean", "std", "resize_short_side", "inference_mode", "crop_size", "stride", "tta_ratios",
                     "flip", "class_names", "palette")
METADATA_DOC = """dinoseg segmentor. Every metadata value is JSON.
Preprocessing: RGB image -> float in [0, 1] -> if resize_short_side is not null, bilinear antialiased resize so the
short side is resize_short_side (other side int(side * scale + 0.5)) -> (x - mean) / std per channel.
Inference: "whole": resize to a multiple of size_multiple (rounded up; exactly input_size for a fixed graph) and run
once; "slide": crop_size x crop_size windows every stride pixels, the last row/column aligned to the border, scores
averaged where windows overlap. Scores are resized (bilinear) to the image size; argmax over classes is the mask;
tta_ratios / flip: the scales (short side x ratio) and horizontal flip averaged after a softmax.
Output class_scores [B, num_classes, H, W] at the input resolution. class_names and palette (RGB) index the classes."""


class ExportError(RuntimeError):
    """A segmentor that cannot be exported (or run from ONNX) as asked; the message says exactly what."""


def require_packages(*names: str, purpose: str):
    """Import the optional export packages, or fail with the one-line install hint."""
    modules, missing = [], []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{purpose} needs the optional package(s) {', '.join(missing)}: {INSTALL_HINT}")
    return modules


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

    def __init__(self, segmentor: FeatureDecoder, decoder: str, patch_size: int):
        super().__init__()
        self.backbone_side, self.head = segmentor.segmentation_model
        self.decoder = decoder
        self.patch_size = patch_size

    def forward(self, image: torch.Tensor):
        size = image.shape[-2:]
        features = self.backbone_side(image)
        if self.decoder == "linear":
            grid = (size[0] // self.patch_size, size[1] // self.patch_size)
            patch_logits = self.head.predict(features, rescale_to=grid)  # already on the grid: no resampling
            return F.interpolate(patch_logits, size=size, mode="bilinear"), patch_logits
        out = self.head(features)  # Mask2Former's predict, written out to also return the stride-4 masks
        masks = F.interpolate(out["pred_masks"], size=size, mode="bilinear", align_corners=False)
        return mask_classification_to_semantic(out["pred_logits"], masks), out["pred_logits"], out["pred_masks"]


def _size_multiple(segmentor: FeatureDecoder) -> int:
    patch = getattr(segmentor.segmentation_model[0], "patch_size", None)
    if not isinstance(patch, int):
        raise ExportError("export_onnx: the backbone side has no integer `patch_size`")
    return patch


def _check_float32(segmentor: nn.Module) -> None:
    """Half-precision tensors cannot be exported faithfully: onnxruntime's CPU kernels lack bfloat16 versions of
    ops such as Sin, and the exporter stores the Python scalars of a bfloat16 expression (e.g. RoPE's 2 * pi) as
    bfloat16 constants, which eager PyTorch never rounds."""
    for kind, named in (("parameter", segmentor.named_parameters()), ("buffer", segmentor.named_buffers())):
        for name, t in named:
            if t.is_floating_point() and t.dtype != torch.float32:
                hint = " (build the backbone with pos_embed_rope_dtype='fp32')" if name.endswith("rope_embed.periods") else ""
                raise ExportError(
                    f"export_onnx: {kind} {name} is {t.dtype}; the exported graph computes in float32 only{hint}"
                )


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


def _sample(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=gen)


# The oldest torch whose exporter handles each head (tested): older ones fail inside torch.export (a linear head's
# batch size is specialised before 2.8; Mask2Former's graph fails before 2.12).
MIN_TORCH = {"linear": "2.8", "m2f": "2.12"}


def _check_torch_version(decoder: str) -> None:
    have = TorchVersion(torch.__version__)
    if have < MIN_TORCH[decoder]:
        name = {"linear": "linear", "m2f": "Mask2Former"}[decoder]
        raise ExportError(f"exporting a {name} head needs torch>={MIN_TORCH[decoder]} (this is torch {have}): "
                          f"pip install 'torch>={MIN_TORCH[decoder]}'")


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip() or type(e).__name__  # the exporter colours its messages
    return text.splitlines()[0][:300]


def _export_graph(module: nn.Module, sample: torch.Tensor, multiple: int | None, opset: int, output_names):
    """The ONNXProgram; `multiple` None = fixed spatial size (the sample's), else sides k * multiple."""
    batch = torch.export.Dim("batch", min=1)
    dims = {0: batch}
    if multiple is not None:
        dims.update({2: multiple * torch.export.Dim("h", min=1), 3: multiple * torch.export.Dim("w", min=1)})
    with _quiet_exporter(), torch.no_grad():
        return torch.onnx.export(
            module,
            (sample,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=list(output_names),
            dynamic_shapes={"image": dims},
            optimize=True,
            verbose=False,
        )


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines (stdout) and its optimiser's notes (INFO / WARNING logs, e.g. "Skipping
    constant folding") go to the debug log; the outcome is checked by `_verify` instead."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(_DebugLog()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


class _DebugLog:
    def write(self, text: str) -> None:
        if text.strip():
            logger.debug("torch.onnx: %s", text.rstrip())

    def flush(self) -> None:
        pass


def _verify(path: Path, module: nn.Module, samples: Sequence[torch.Tensor], output_names) -> float:
    """Largest |onnxruntime - PyTorch| over the outputs and samples, relative to each output's scale (>= 1);
    raises ExportError naming the output, sample and difference when it is above VERIFY_TOLERANCE."""
    (onnx, ort) = require_packages("onnx", "onnxruntime", purpose="verifying an ONNX export")
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in samples:
        with torch.no_grad():
            expected = module(x)
        try:
            got = session.run(list(output_names), {INPUT: x.numpy()})
        except Exception as e:
            raise ExportError(f"onnxruntime failed on a {list(x.shape)} input: {_first_line(e)}") from None
        for name, ref, out in zip(output_names, expected, got):
            ref = ref.numpy()
            if out.shape != ref.shape:
                raise ExportError(f"output {name}: onnxruntime gives {list(out.shape)}, PyTorch {list(ref.shape)} "
                                  f"on a {list(x.shape)} input")
            diff = float(np.abs(out - ref).max() / max(1.0, float(np.abs(ref).max())))
            if not diff <= VERIFY_TOLERANCE:
                raise ExportError(f"output {name}: onnxruntime differs from PyTorch by {diff:.2e} (relative) on a "
                                  f"{list(x.shape)} input")
            worst = max(worst, diff)
    return worst


def _metadata_props(metadata: dict) -> dict[str, str]:
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ExportError(f"export_onnx: metadata lacks {missing}; build it with deployment_metadata()")
    try:
        return {k: json.dumps(v) for k, v in metadata.items()}
    except TypeError as e:
        raise ExportError(f"export_onnx: metadata values must be JSON-serialisable ({e})") from None


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
        segmentor: a `build_segmentation_decoder` model (linear or Mask2Former head), on the CPU.
        path: the .onnx file to write (replaced only once the new one is verified).
        image_size: None for a dynamic spatial size (multiples of the patch size), or a fixed (H, W).
        opset: ONNX opset (>= 18).
        metadata: `deployment_metadata(...)` (default: its defaults), stored in `metadata_props` as JSON values,
            together with `format`, `decoder`, `num_classes`, `size_multiple`, `input_size` ("dynamic" or
            [H, W]), `outputs` and `opset`.
    The batch size is always dynamic.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later")
    require_packages("onnx", "onnxruntime", "onnxscript", purpose="exporting to ONNX")
    decoder = _decoder_type(segmentor)
    _check_torch_version(decoder)
    _check_float32(segmentor)
    if any(p.device.type != "cpu" for p in segmentor.parameters()):
        raise ExportError("export_onnx: move the segmentor to the CPU first (segmentor.cpu())")
    metadata = dict(deployment_metadata() if metadata is None else metadata)
    _metadata_props(metadata)  # fail before the slow part
    multiple = _size_multiple(segmentor)
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
    metadata.update(format=FORMAT, decoder=decoder, size_multiple=multiple, opset=opset, num_classes=num_classes,
                    outputs=[SCORES, *HEAD_OUTPUTS[decoder]])
    path = Path(path)
    with _export_mode(segmentor):
        module = _DeployedSegmentor(segmentor, decoder, multiple).eval()
        if image_size is not None:
            return _write(module, path, image_size, multiple, opset, metadata)
        try:
            return _write(module, path, None, multiple, opset, metadata)
        except _DynamicSizeError as e:
            logger.warning("export: a dynamic input size cannot be made exact (%s); exporting a fixed %d x %d graph "
                           "(the slide crop) instead", e, *crop)
            return _write(module, path, crop, multiple, opset, metadata)


class _DynamicSizeError(ExportError):
    """The dynamic-size graph does not follow its input size."""


def _write(module: nn.Module, path: Path, fixed_size, multiple: int, opset: int, metadata: dict) -> Path:
    """Export (`fixed_size` None: dynamic sides k * multiple), verify in a temporary folder, move into place."""
    start = time.perf_counter()
    dynamic = fixed_size is None
    if dynamic:  # two sizes and batch sizes: a size that was baked in as a constant shows on the second one
        samples = [_sample(2, (4 * multiple, 6 * multiple), 0), _sample(1, (5 * multiple, 3 * multiple), 1)]
    else:
        samples = [_sample(2, fixed_size, 0), _sample(1, fixed_size, 1)]
    output_names = metadata["outputs"]
    try:
        program = _export_graph(module, samples[0], multiple if dynamic else None, opset, output_names)
    except Exception as e:
        logger.debug("torch.onnx.export failed", exc_info=True)
        if dynamic and ("Constraints violated" in str(e) or "specialized" in str(e)):
            raise _DynamicSizeError(f"torch.export specialised the input size: {_first_line(e)}") from None
        raise ExportError(f"torch.onnx could not export the segmentor: {_first_line(e)}") from None
    metadata = {**metadata, "input_size": "dynamic" if dynamic else list(fixed_size)}
    program.model.metadata_props.update(_metadata_props(metadata))
    program.model.doc_string = METADATA_DOC
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        program.save(str(staged))
        worst = _verify(staged, module, samples[:1], output_names)
        try:
            worst = max(worst, _verify(staged, module, samples[1:], output_names))
        except ExportError as e:
            if not dynamic:
                raise
            raise _DynamicSizeError(f"the graph does not follow the input size: {e}") from None
        for p in Path(tmp).iterdir():  # external weights (graphs over 2 GB) first, the graph last
            if p != staged:
                shutil.move(str(p), path.parent / p.name)
        staged.replace(path)
    logger.info("export: wrote %s (%.1f MB, %s input size, onnxruntime within %.1e of PyTorch) in %.1f s", path,
                path.stat().st_size / 1e6, "dynamic" if dynamic else "fixed", worst, time.perf_counter() - start)
    return path
