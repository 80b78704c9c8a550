"""Run an exported detector (`dinoseg export` of a detection run) with onnxruntime, as a drop-in for the detector
in eval mode.

`OnnxDetector(path)(x)` returns what the PyTorch detector returns in eval mode for the graph's outputs:
``{"pred_logits", "pred_boxes"}`` of the one-to-one queries. The preprocessing (`eval_transforms()`), the
post-processing (`postprocess()`: `PostProcess` with the file's `topk` and box kind) and the categories come from
the file's metadata.
"""

import torch
from torchvision.transforms import v2

from ...engine.onnx_runtime import OnnxModel
from .export import FORMAT, OUTPUTS, REQUIRED_METADATA
from .models.detr import PostProcess
from .transforms import DetectionTransform

__all__ = ["OnnxDetector"]


class OnnxDetector(OnnxModel):
    """An exported detector on onnxruntime (CPU by default).

    Args:
        path: the .onnx file written by `export_onnx`.
        threads: onnxruntime intra-op threads (None: its default, one per physical core).
        providers: onnxruntime execution providers.
    """

    FORMAT = FORMAT
    KIND = "detector"
    REQUIRED_METADATA = (*REQUIRED_METADATA, "reparam", "num_classes")

    def check_metadata(self) -> None:
        """Every value the runtime reads: one line naming the key at fault."""
        m = self.metadata
        if self.input_size is None:
            self.bad_metadata("input_size", "dynamic", "a fixed [H, W] (detectors are exported at a fixed size)")
        for key in ("mean", "std"):
            if not (isinstance(m[key], list) and len(m[key]) == 3 and all(isinstance(v, (int, float)) for v in m[key])):
                self.bad_metadata(key, m[key], "3 numbers")
        if not isinstance(m["reparam"], bool):
            self.bad_metadata("reparam", m["reparam"], "true or false")
        n = self._int(m, "num_classes")
        self._int(m, "topk")
        if not (isinstance(m["score_threshold"], (int, float)) and 0 <= m["score_threshold"] <= 1):
            self.bad_metadata("score_threshold", m["score_threshold"], "a number in [0, 1]")
        for key in ("category_ids", "category_names", "colours"):
            if not (isinstance(m[key], list) and len(m[key]) == n):
                self.bad_metadata(key, m[key], f"a list of {n} entries, one per label")
        logits = self.output_shape(OUTPUTS[0])[-1]
        if logits != n:
            self.bad_metadata("num_classes", n, f"the graph's {logits} class logits")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] of images `x` (the graph's size), on x's device."""
        self.check_size(x)
        return dict(zip(OUTPUTS, self.run(x, OUTPUTS)))

    def eval_transforms(self) -> DetectionTransform:
        """uint8 image (and its target) -> normalised float image resized to the graph's size, as at export time."""
        m = self.metadata
        return DetectionTransform([v2.Resize(list(self.input_size), antialias=True)], mean=tuple(m["mean"]),
                                  std=tuple(m["std"]), reparam=m["reparam"])

    def postprocess(self) -> PostProcess:
        return PostProcess(self.metadata["topk"], self.metadata["reparam"])

    def categories(self) -> tuple[dict[int, int], dict[int, str], dict[int, tuple]]:
        """(label -> category id, category id -> name, category id -> colour), the labels of no category left out."""
        m = self.metadata
        labels = {k: c for k, c in enumerate(m["category_ids"]) if c is not None}
        names = {c: m["category_names"][k] or str(c) for k, c in labels.items()}
        colours = {c: tuple(m["colours"][k]) for k, c in labels.items()}
        return labels, names, colours
