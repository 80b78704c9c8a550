"""Running an exported graph (`engine.export.write_onnx`) with onnxruntime: the part every task shares.

`OnnxModel(path)` opens the file, reads its metadata (JSON values) and checks it before anything runs: the
`format` must be the task's, every key the task needs must be there with a value of the right kind, and what the
metadata says about the graph must agree with the graph (a task adds its own checks in `check_metadata`). Each
problem is one `ExportError` naming the file and the key. A task subclasses it with the interface of its PyTorch
models (`OnnxSegmentor`, `OnnxDepther`).
"""

from pathlib import Path

import torch
from torch import nn

from .export import INPUT, ExportError, decode_metadata, first_line, require_packages

__all__ = ["OnnxModel"]


class OnnxModel(nn.Module):
    """An exported graph on onnxruntime (CPU by default); a module without parameters, so code written for the
    PyTorch model keeps its tensors on the input's device.

    Args:
        path: the .onnx file.
        threads: onnxruntime intra-op threads (None: its default, one per physical core).
        providers: onnxruntime execution providers.
    Subclasses set `FORMAT` (the metadata `format` they run), `KIND` (what the file is, for messages) and
    `REQUIRED_METADATA`.
    """

    FORMAT = ""
    KIND = "ONNX model"
    REQUIRED_METADATA: tuple[str, ...] = ()

    def __init__(self, path: str | Path, *, threads: int | None = None, providers=("CPUExecutionProvider",)):
        super().__init__()
        (ort,) = require_packages("onnxruntime", purpose=f"running an ONNX {self.KIND}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as e:
            raise ExportError(f"{path}: onnxruntime cannot load it ({first_line(e)[:200]})") from None
        self.path = path
        props = self.session.get_modelmeta().custom_metadata_map
        fmt = props.get("format")
        if fmt is None or decode_metadata(path, {"format": fmt})["format"] != self.FORMAT:
            raise ExportError(f"{path}: not a dinoseg {self.KIND} export (metadata format is {fmt!r}, expected "
                              f"{self.FORMAT!r})")
        self.metadata = decode_metadata(path, props)
        missing = [k for k in (*self.REQUIRED_METADATA, "input_size", "size_multiple", "outputs") if k not in self.metadata]
        if missing:
            raise ExportError(f"{path}: metadata lacks {', '.join(missing)}")
        m = self.metadata
        self.size_multiple = self._int(m, "size_multiple")
        size = m["input_size"]
        if size != "dynamic" and not (isinstance(size, list) and len(size) == 2 and all(_positive_int(s) for s in size)):
            self.bad_metadata("input_size", size, '"dynamic" or [H, W]')
        self.input_size = None if size == "dynamic" else tuple(size)
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if m["outputs"] != graph_outputs:
            self.bad_metadata("outputs", m["outputs"], f"the graph's outputs {graph_outputs}")
        self.check_metadata()

    def check_metadata(self) -> None:
        """The task's checks of `self.metadata` (raise through `bad_metadata`)."""

    def bad_metadata(self, key: str, value, expected: str):
        raise ExportError(f"{self.path}: metadata {key} is {_short(value)}; expected {expected}")

    def _int(self, metadata: dict, key: str) -> int:
        if not _positive_int(metadata[key]):
            self.bad_metadata(key, metadata[key], "a positive integer")
        return int(metadata[key])

    def _numbers(self, metadata: dict, key: str, n: int) -> list:
        value = metadata[key]
        if not (isinstance(value, list) and len(value) == n and all(isinstance(v, (int, float)) for v in value)):
            self.bad_metadata(key, value, f"{n} numbers")
        return value

    def _bool(self, metadata: dict, key: str) -> bool:
        if not isinstance(metadata[key], bool):
            self.bad_metadata(key, metadata[key], "true or false")
        return metadata[key]

    def output_shape(self, name: str) -> list:
        """The graph's declared shape of output `name` (ints for static dimensions, names for dynamic ones)."""
        return next(o.shape for o in self.session.get_outputs() if o.name == name)

    def extra_repr(self) -> str:
        size = "dynamic" if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}"
        return f"{self.path.name}, input size {size}"

    def check_size(self, x: torch.Tensor) -> None:
        """Images [B, 3, H, W] of a size the graph takes (ValueError otherwise)."""
        size = tuple(x.shape[-2:])
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.path.name}: expected images [B, 3, H, W], got shape {list(x.shape)}")
        if self.input_size is not None and size != self.input_size:
            raise ValueError(f"{self.path.name} was exported for {self.input_size[0]}x{self.input_size[1]} inputs, "
                             f"got {size[0]}x{size[1]}")
        if any(s % self.size_multiple for s in size):
            raise ValueError(f"{self.path.name}: input size {size[0]}x{size[1]} is not a multiple of "
                             f"{self.size_multiple}")

    def run(self, x: torch.Tensor, names) -> list[torch.Tensor]:
        """The graph's outputs `names` for images `x`, on x's device."""
        feed = {INPUT: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        return [torch.from_numpy(out).to(x.device) for out in self.session.run(list(names), feed)]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
