"""Run an exported detector (`dinoseg export` of a detection run) with onnxruntime, as a drop-in for the detector
in eval mode.

`OnnxDetector(path)(samples)` takes what the PyTorch detector takes (a list of (3, H, W) images, a (B, 3, H, W)
batch or a `NestedTensor`), pads it onto the graph's canvas with its mask (`canvas_batch`), and returns what the
detector returns in eval mode for that padded batch: ``{"pred_logits", "pred_boxes"}`` of the one-to-one queries.
The preprocessing (`eval_transforms()`: the eval resize keeping the aspect ratio, fitted to the canvas), the
post-processing (`postprocess()`: `PostProcess` with the file's `topk` and box kind) and the categories come from
the file's metadata.
"""

import torch
import torch.nn.functional as F

from ...engine.onnx_runtime import OnnxModel
from .export import FORMAT, INPUTS, OUTPUTS, REQUIRED_METADATA
from .models.detr import PostProcess
from .transforms import DetectionTransform, FitResize
from .util.misc import NestedTensor, nested_tensor_from_tensor_list

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
    REQUIRED_METADATA = (*REQUIRED_METADATA, "reparam", "num_classes", "inputs")

    def check_metadata(self) -> None:
        """Every value the runtime reads: one line naming the key at fault."""
        m = self.metadata
        if self.input_size is None:
            self.bad_metadata("input_size", "dynamic", "a fixed [H, W] (detectors are exported at a fixed size)")
        for key in ("mean", "std"):
            self._numbers(m, key, 3)
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if m["inputs"] != list(INPUTS) or graph_inputs != list(INPUTS):
            self.bad_metadata("inputs", m["inputs"], f"{list(INPUTS)}, the graph's inputs (it has {graph_inputs})")
        size = self._int(m, "eval_size")
        if m["eval_max_size"] is not None and not (self._int(m, "eval_max_size") >= size):
            self.bad_metadata("eval_max_size", m["eval_max_size"], f"null or at least eval_size {size}")
        self._bool(m, "reparam")
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

    def canvas_batch(self, samples) -> NestedTensor:
        """A list of normalised (3, H, W) images, a (B, 3, H, W) batch or a `NestedTensor`, each image at most the
        graph's size, as the graph's inputs: padded with zeros at the bottom and right to exactly `input_size`, the
        mask True on the padding (and where `samples`' own mask is). ValueError, in one line, on anything else."""
        if isinstance(samples, NestedTensor):
            images, mask = samples.decompose()
        elif isinstance(samples, torch.Tensor):
            images, mask = samples, None
        elif isinstance(samples, (list, tuple)) and samples and all(isinstance(s, torch.Tensor) for s in samples):
            if any(s.ndim != 3 or s.shape[0] != 3 for s in samples):
                raise ValueError(f"{self.path.name}: expected (3, H, W) images, got shapes "
                                 f"{[list(s.shape) for s in samples]}")
            images, mask = nested_tensor_from_tensor_list(list(samples)).decompose()
        else:
            raise ValueError(f"{self.path.name}: expected a list of (3, H, W) images, a (B, 3, H, W) tensor or a "
                             f"NestedTensor, not {type(samples).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.path.name}: expected images [B, 3, H, W], got shape {list(images.shape)}")
        height, width = images.shape[-2:]
        self._check_fits(height, width)
        if mask is None:
            mask = torch.zeros((images.shape[0], height, width), dtype=torch.bool, device=images.device)
        elif mask.dtype != torch.bool or tuple(mask.shape) != (images.shape[0], height, width):
            raise ValueError(f"{self.path.name}: the padding mask must be bool [B, H, W] = {[images.shape[0], height, width]}, "
                             f"got {mask.dtype} {list(mask.shape)}")
        pad = (0, self.input_size[1] - width, 0, self.input_size[0] - height)
        return NestedTensor(F.pad(images, pad), F.pad(mask, pad, value=True))

    def _check_fits(self, height: int, width: int) -> None:
        canvas_h, canvas_w = self.input_size
        if height > canvas_h or width > canvas_w:
            raise ValueError(f"{self.path.name} was exported for {canvas_h}x{canvas_w} inputs (smaller ones are padded), "
                             f"got {height}x{width}: resize it with eval_transforms()")

    @torch.no_grad()
    def forward(self, samples) -> dict[str, torch.Tensor]:
        """``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] of `samples` (`canvas_batch`), on their device."""
        images, mask = self.canvas_batch(samples).decompose()
        feed = {INPUTS[0]: images.detach().to("cpu", torch.float32).contiguous().numpy(),
                INPUTS[1]: mask.to("cpu").contiguous().numpy()}
        return {name: torch.from_numpy(out).to(images.device)
                for name, out in zip(OUTPUTS, self.session.run(list(OUTPUTS), feed))}

    def eval_transforms(self) -> DetectionTransform:
        """uint8 image (and its target) -> normalised float image resized as PyTorch's eval transform does (short
        side `eval_size`, long side at most `eval_max_size`), scaled down to fit the graph's size where it does not
        (`transforms.fitted_size`); its aspect ratio is kept, and `canvas_batch` pads it."""
        m = self.metadata
        return DetectionTransform([FitResize(m["eval_size"], m["eval_max_size"], self.input_size)], mean=tuple(m["mean"]),
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
