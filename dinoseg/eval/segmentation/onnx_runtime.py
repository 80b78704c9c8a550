"""Run an exported segmentor (`dinoseg export`) with onnxruntime, as a drop-in for the PyTorch segmentors.

`OnnxSegmentor(path).predict(x, rescale_to)` returns what the PyTorch segmentor's `predict` returns (linear
logits, or the Mask2Former `pred_logits` / `pred_masks` dict when resizing), so `slide_inference`,
`make_inference` and `make_tta_inference` run on it unchanged, with the sliding window outside the graph. The
preprocessing and inference settings come from the file's metadata: `eval_transforms()`, `inference_settings()`.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .export import FORMAT, INPUT, SCORES, ExportError, require_packages
from .inference import InferenceMode, InferenceSettings
from .transforms import SegmentationTransform, make_single_view_eval_transforms

__all__ = ["OnnxSegmentor"]


class OnnxSegmentor(nn.Module):
    """An exported segmentor on onnxruntime (CPU by default); a module without parameters, so the inference
    functions keep their accumulators on the input's device.

    Args:
        path: the .onnx file written by `export_onnx`.
        threads: onnxruntime intra-op threads (None: its default, one per physical core).
        providers: onnxruntime execution providers.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, providers=("CPUExecutionProvider",)):
        super().__init__()
        (ort,) = require_packages("onnxruntime", purpose="running an ONNX segmentor")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as e:
            raise ExportError(f"{path}: onnxruntime cannot load it ({str(e).strip().splitlines()[0][:200]})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if json.loads(props.get("format", "null")) != FORMAT:
            raise ExportError(f"{path}: not a dinoseg segmentor export (metadata format is {props.get('format')!r}, "
                              f"expected {FORMAT!r})")
        try:
            self.metadata = {k: json.loads(v) for k, v in props.items()}
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}: metadata is not JSON ({e})") from None
        m = self.metadata
        self.path = path
        self.decoder = m["decoder"]
        self.num_classes = int(m["num_classes"])
        self.size_multiple = int(m["size_multiple"])
        self.input_size = None if m["input_size"] == "dynamic" else tuple(m["input_size"])
        self.class_names = m["class_names"]
        self.palette = [tuple(c) for c in m["palette"]] if m["palette"] else None

    def extra_repr(self) -> str:
        size = "dynamic" if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}"
        return f"{self.path.name}, {self.decoder}, {self.num_classes} classes, input size {size}"

    def _check_size(self, x: torch.Tensor) -> None:
        size = tuple(x.shape[-2:])
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.path.name}: expected images [B, 3, H, W], got shape {list(x.shape)}")
        if self.input_size is not None and size != self.input_size:
            raise ValueError(f"{self.path.name} was exported for {self.input_size[0]}x{self.input_size[1]} inputs, "
                             f"got {size[0]}x{size[1]}")
        if any(s % self.size_multiple for s in size):
            raise ValueError(f"{self.path.name}: input size {size[0]}x{size[1]} is not a multiple of "
                             f"{self.size_multiple}")

    def _run(self, x: torch.Tensor, names) -> list[torch.Tensor]:
        feed = {INPUT: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        return [torch.from_numpy(out).to(x.device) for out in self.session.run(list(names), feed)]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, rescale_to=(512, 512)):
        """The PyTorch segmentor's `predict(x, rescale_to)`: class scores [B, C, *rescale_to] (Mask2Former: the
        `pred_logits` / `pred_masks` dict when `rescale_to` is not the input size), on x's device."""
        self._check_size(x)
        rescale_to = tuple(int(s) for s in rescale_to)
        if rescale_to == tuple(x.shape[-2:]):
            return self._run(x, [SCORES])[0]
        # Resize the head output as the PyTorch heads do, not the full-resolution scores (a second resampling).
        if self.decoder == "linear":
            (logits,) = self._run(x, ["patch_logits"])
            return F.interpolate(logits, size=rescale_to, mode="bilinear")
        pred_logits, pred_masks = self._run(x, ["pred_logits", "pred_masks"])
        masks = F.interpolate(pred_masks, size=rescale_to, mode="bilinear", align_corners=False)
        return {"pred_logits": pred_logits, "pred_masks": masks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at the input resolution (the graph's `class_scores`)."""
        self._check_size(x)
        return self._run(x, [SCORES])[0]

    def eval_transforms(self) -> SegmentationTransform:
        """uint8 image -> resized, normalised float image, as at export time."""
        m = self.metadata
        return make_single_view_eval_transforms(m["resize_short_side"], mean=m["mean"], std=m["std"])

    def inference_settings(self) -> InferenceSettings:
        """How to turn an image into class probabilities with this model, from the metadata."""
        m = self.metadata
        return InferenceSettings(
            mode=InferenceMode(m["inference_mode"]),
            crop_size=(m["crop_size"], m["crop_size"]),
            stride=(m["stride"], m["stride"]),
            tta_ratios=tuple(m["tta_ratios"]),
            use_flip=bool(m["flip"]),
            whole_size=self.input_size,
        )

    @property
    def patch_size(self) -> int:
        """The multiple a dynamic input size must be (whole-image inference rounds images up to it)."""
        return self.size_multiple
