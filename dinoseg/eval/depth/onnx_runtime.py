"""Run an exported depther (`dinoseg export` of a depth run) with onnxruntime, as a drop-in for `Depther`.

`OnnxDepther(path)(x)` returns what `Depther(x)` returns: depth in metres [B, 1, h, w] at the head's resolution.
The preprocessing and the flip TTA come from the file's metadata: `eval_transforms()`, `flip`.
"""

import torch

from ...engine.onnx_runtime import OnnxModel
from .export import DEPTH, FORMAT, REQUIRED_METADATA
from .transforms import DepthTransform, make_depth_eval_transforms

__all__ = ["OnnxDepther"]


class OnnxDepther(OnnxModel):
    """An exported depther on onnxruntime (CPU by default).

    Args:
        path: the .onnx file written by `export_onnx`.
        threads: onnxruntime intra-op threads (None: its default, one per physical core).
        providers: onnxruntime execution providers.
    """

    FORMAT = FORMAT
    KIND = "depther"
    REQUIRED_METADATA = REQUIRED_METADATA

    def check_metadata(self) -> None:
        """Every value the runtime reads: one line naming the key at fault."""
        m = self.metadata
        size = m["img_size"]
        if not (size is None or (isinstance(size, int) and size > 0) or
                (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size))):
            self.bad_metadata("img_size", size, "null, a positive integer or [H, W]")
        if self.input_size is not None and size != list(self.input_size):
            self.bad_metadata("img_size", size, f"the graph's fixed input size {list(self.input_size)}")
        for key in ("mean", "std"):
            self._numbers(m, key, 3)
        self._bool(m, "flip")
        channels = self.output_shape(DEPTH)[1]
        if channels != 1:
            self.bad_metadata("outputs", m["outputs"], f"a {DEPTH} output of one channel (it has {channels})")
        self.flip = m["flip"]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Depth in metres [B, 1, h, w] (the graph's `depth`), on x's device."""
        self.check_size(x)
        return self.run(x, [DEPTH])[0]

    def eval_transforms(self) -> DepthTransform:
        """uint8 image (and a placeholder depth) -> resized, normalised float image, as at export time."""
        m = self.metadata
        size = m["img_size"] if m["img_size"] is None or isinstance(m["img_size"], int) else tuple(m["img_size"])
        return make_depth_eval_transforms(img_size=size, mean=tuple(m["mean"]), std=tuple(m["std"]))
