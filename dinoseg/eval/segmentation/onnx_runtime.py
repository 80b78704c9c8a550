"""Run an exported segmentor (`dinoseg export`) with onnxruntime, as a drop-in for the PyTorch segmentors.

`OnnxSegmentor(path).predict(x, rescale_to)` returns what the PyTorch segmentor's `predict` returns (linear
logits, or the Mask2Former `pred_logits` / `pred_masks` dict when resizing), so `slide_inference`,
`make_inference` and `make_tta_inference` run on it unchanged, with the sliding window outside the graph. The
preprocessing and inference settings come from the file's metadata: `eval_transforms()`, `inference_settings()`.
"""

import torch
import torch.nn.functional as F

from ...engine.onnx_runtime import OnnxModel
from .export import FORMAT, HEAD_OUTPUTS, REQUIRED_METADATA, SCORES
from .inference import InferenceMode, InferenceSettings
from .transforms import SegmentationTransform, make_single_view_eval_transforms

__all__ = ["OnnxSegmentor"]


class OnnxSegmentor(OnnxModel):
    """An exported segmentor on onnxruntime (CPU by default); a module without parameters, so the inference
    functions keep their accumulators on the input's device.

    Args:
        path: the .onnx file written by `export_onnx`.
        threads: onnxruntime intra-op threads (None: its default, one per physical core).
        providers: onnxruntime execution providers.
    """

    FORMAT = FORMAT
    KIND = "segmentor"
    REQUIRED_METADATA = (*REQUIRED_METADATA, "decoder", "num_classes")

    def check_metadata(self) -> None:
        """Every value the runtime reads, checked against the graph: one line naming the key at fault."""
        m = self.metadata
        if m["decoder"] not in HEAD_OUTPUTS:
            self.bad_metadata("decoder", m["decoder"], f"one of {sorted(HEAD_OUTPUTS)}")
        self.decoder = m["decoder"]
        self.num_classes = self._int(m, "num_classes")
        channels = self.output_shape(SCORES)[1]
        if isinstance(channels, int) and channels != self.num_classes:
            self.bad_metadata("num_classes", self.num_classes, f"the {channels} channels of the graph's {SCORES}")
        for key in ("class_names", "palette"):
            value = m[key]
            if value is not None and (not isinstance(value, list) or len(value) != self.num_classes):
                self.bad_metadata(key, value, f"null or one entry per class ({self.num_classes})")
        if m["palette"] is not None and not all(isinstance(c, list) and len(c) == 3 and
                                                all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in m["palette"]):
            self.bad_metadata("palette", m["palette"], "RGB triples of integers in [0, 255]")
        if m["inference_mode"] not in ("whole", "slide"):
            self.bad_metadata("inference_mode", m["inference_mode"], '"whole" or "slide"')
        for key in ("crop_size", "stride"):
            self._int(m, key)
        if m["resize_short_side"] is not None:
            self._int(m, "resize_short_side")
        ratios = m["tta_ratios"]
        if not (isinstance(ratios, list) and ratios and all(isinstance(r, (int, float)) and r > 0 for r in ratios)):
            self.bad_metadata("tta_ratios", ratios, "a list of positive numbers")
        self._bool(m, "flip")
        for key in ("mean", "std"):
            self._numbers(m, key, 3)
        patch = m.get("patch_size", self.size_multiple)  # files written before `patch_size` was stored
        if patch is not None and not (isinstance(patch, int) and patch > 0):
            self.bad_metadata("patch_size", patch, "null or a positive integer")
        self._patch_size = patch
        self.class_names = m["class_names"]
        self.palette = [tuple(c) for c in m["palette"]] if m["palette"] else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.decoder}, {self.num_classes} classes"

    @torch.no_grad()
    def predict(self, x: torch.Tensor, rescale_to=(512, 512)):
        """The PyTorch segmentor's `predict(x, rescale_to)`: class scores [B, C, *rescale_to] (Mask2Former: the
        `pred_logits` / `pred_masks` dict when `rescale_to` is not the input size), on x's device."""
        self.check_size(x)
        rescale_to = tuple(int(s) for s in rescale_to)
        if rescale_to == tuple(x.shape[-2:]):
            return self.run(x, [SCORES])[0]
        # Resize the head output as the PyTorch heads do, not the full-resolution scores (a second resampling).
        if self.decoder == "linear":
            (logits,) = self.run(x, ["patch_logits"])
            return F.interpolate(logits, size=rescale_to, mode="bilinear")
        pred_logits, pred_masks = self.run(x, ["pred_logits", "pred_masks"])
        masks = F.interpolate(pred_masks, size=rescale_to, mode="bilinear", align_corners=False)
        return {"pred_logits": pred_logits, "pred_masks": masks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores at the input resolution (the graph's `class_scores`)."""
        self.check_size(x)
        return self.run(x, [SCORES])[0]

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
    def patch_size(self) -> int | None:
        """The backbone's patch size (None: a ConvNeXt's stage grids), as the PyTorch segmentor's backbone side
        gives it: whole-image inference rounds images up to it (32 when None), and slide inference pads crops to
        multiples of it."""
        return self._patch_size
