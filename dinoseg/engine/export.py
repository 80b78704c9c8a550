"""ONNX export shared by every task: one float32 graph `image -> outputs`, written only once it is right.

A task builds the module to export (images in, a tuple of named outputs) and its metadata; `write_onnx` does the
rest, the same way for every task:
- the target is checked before anything slow (a directory, a parent that is a file, a name without `.onnx`, a
  folder that cannot be written are refused, naming the path given);
- the graph is traced with torch.export (`torch.onnx.export(dynamo=True)`), the batch size always dynamic and
  the spatial size either dynamic (sides `k * size_multiple`) or fixed; the exporter's progress lines and notes
  go to the debug log;
- it is simplified by onnxscript's constant folding and clean-up passes, without its pattern rewriter (a fifth of
  a Mask2Former export, for nothing onnxruntime does not do itself when it loads the graph);
- the file is written in a temporary folder beside the target, checked with `onnx.checker`, run by onnxruntime
  on sample images (two sizes and batch sizes when the size is dynamic) and compared with PyTorch, then renamed
  into place: a failed export leaves no file and no folder, and an existing target is replaced only by a verified
  graph;
- a dynamic size that torch.export cannot keep symbolic, or that does not reproduce PyTorch at a second size,
  falls back to the task's fixed size (with a warning) when it has one;
- the metadata is stored in `metadata_props` as JSON values, with `input_size` ("dynamic" or [H, W]), `opset`
  and `outputs` added;
- a fixed-size graph may take more inputs after `image` (`extra_inputs`, e.g. detection's padding mask), batched
  with it; their samples for tracing and verification come from the task;
- a backbone adapted with LoRA is exported with its adapters folded into its weights (one plain graph, the
  official backbone structure), after checking that the merged model's outputs equal the unmerged one's within
  `MERGE_TOLERANCE`; the model is left as it was.

Where the time goes (`benchmarks/export_onnx.py`, README "Deploying as ONNX"): nearly all of it is tracing,
torch.export then the exporter's decomposition of its graph (a second trace), both with symbolic sizes when the
size is dynamic; a fixed size traces 2 to 3 times faster. Optimising and verifying take seconds.
"""

import contextlib
import functools
import importlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.torch_version import TorchVersion

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportReport",
    "check_output_path",
    "read_onnx_metadata",
    "require_packages",
    "write_onnx",
]

logger = logging.getLogger("dinoseg")

INSTALL_HINT = "pip install 'dinoseg[export]'"
# torch's ONNX exporter writes opset 18 and later: its down-conversion to 17 gives invalid graphs (e.g. `Split`
# keeps its opset-18 `num_outputs` attribute).
MIN_OPSET = 18
DEFAULT_OPSET = 18
INPUT = "image"
# Structural export errors (a wrong size rule, a constant that should follow the input) show as differences of
# the order of the outputs; float32 reordering in a deep backbone stays far below this fraction of their scale.
VERIFY_TOLERANCE = 1e-3
MERGE_TOLERANCE = 1e-5  # merged LoRA vs the adapters computed apart: float32 rounding only


class ExportError(RuntimeError):
    """A model that cannot be exported (or run from ONNX) as asked; the message says exactly what."""


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


def check_torch_version(minimum: str, what: str) -> None:
    """Refuse, in one line, a torch older than the oldest whose exporter handles `what` (tested)."""
    have = TorchVersion(torch.__version__)
    if have < minimum:
        raise ExportError(f"exporting {what} needs torch>={minimum} (this is torch {have}): pip install 'torch>={minimum}'")


def check_exportable(module: nn.Module, what: str) -> None:
    """On the CPU and float32 throughout. Half-precision tensors cannot be exported faithfully: onnxruntime's CPU
    kernels lack bfloat16 versions of ops such as Sin, and the exporter stores the Python scalars of a bfloat16
    expression (e.g. RoPE's 2 * pi) as bfloat16 constants, which eager PyTorch never rounds."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            if t.device.type != "cpu":
                raise ExportError(f"{what}: move the model to the CPU first (.cpu()); {kind} {name} is on {t.device}")
            if t.is_floating_point() and t.dtype != torch.float32:
                hint = " (build the backbone with pos_embed_rope_dtype='fp32')" if name.endswith("rope_embed.periods") else ""
                raise ExportError(f"{what}: {kind} {name} is {t.dtype}; the exported graph computes in float32 only{hint}")


def first_line(e: BaseException) -> str:
    """The first line of an error message, without the exporter's colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def check_output_path(path: str | os.PathLike) -> Path:
    """The `.onnx` file to write, refused in one line naming it when it cannot be: an existing directory, a name
    without the `.onnx` suffix (which would let a typo replace a checkpoint or a config), a parent that is a
    file, a folder that cannot be written. Missing parent folders are created only once the graph is verified."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; name the .onnx file to write (e.g. {path / 'model.onnx'})")
    if path.suffix.lower() != ".onnx":
        raise ExportError(f"{path}: the exported file must end in .onnx")
    anchor = _existing_ancestor(path.parent)
    if not anchor.is_dir():
        raise ExportError(f"{path}: cannot create it, {anchor} is not a directory")
    try:  # what the export will do there (permissions alone do not tell: /proc, a read-only mount)
        tempfile.TemporaryDirectory(dir=anchor, prefix=f".{path.name}.").cleanup()
    except OSError as e:
        raise ExportError(f"{path}: cannot write in {anchor} ({e.strerror or e})") from None
    return path


def _existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's progress lines (stdout) and its optimiser's notes (INFO / WARNING logs, e.g. "Skipping
    constant folding") go to the debug log; the outcome is checked by the verification instead."""
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


# -- metadata --------------------------------------------------------------------------------------------------


def metadata_props(metadata: dict) -> dict[str, str]:
    """Metadata as ONNX `metadata_props`: every value JSON."""
    try:
        return {str(k): json.dumps(v) for k, v in metadata.items()}
    except TypeError as e:
        raise ExportError(f"export: metadata values must be JSON-serialisable ({e})") from None


def decode_metadata(path: str | os.PathLike, props: dict[str, str]) -> dict:
    """`metadata_props` of an exported file -> values; a value that is not JSON is named."""
    out = {}
    for key, text in props.items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            raise ExportError(f"{path}: metadata {key} is not JSON ({text[:60]!r})") from None
    return out


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `metadata_props` of an ONNX file, read from its top-level protobuf fields without loading the graph
    (a multi-GB file costs a few reads) and without the onnx package."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    props = {}
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            while f.tell() < size:
                number, wire = _tag(f)
                if wire != 2:  # varints and fixed-size fields: skipped
                    _skip(f, wire)
                    continue
                length = _varint(f)
                if f.tell() + length > size:
                    raise ValueError("truncated")
                if number == 14:  # ModelProto.metadata_props: StringStringEntryProto {key = 1, value = 2}
                    entry = _fields(f.read(length))
                    props[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
                else:
                    f.seek(length, os.SEEK_CUR)
    except (ValueError, UnicodeDecodeError):
        raise ExportError(f"{path}: not an ONNX file") from None
    return props


def _varint(f) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte or shift > 63:
            raise ValueError("bad varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def _tag(f) -> tuple[int, int]:
    tag = _varint(f)
    if tag >> 3 == 0:
        raise ValueError("field number 0")
    return tag >> 3, tag & 7


def _skip(f, wire: int) -> None:
    if wire == 0:
        _varint(f)
    elif wire in (1, 5):
        f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
    else:
        raise ValueError(f"wire type {wire}")


def _fields(data: bytes) -> dict[int, bytes]:
    """Length-delimited fields of a small message."""
    f, out = io.BytesIO(data), {}
    while f.tell() < len(data):
        number, wire = _tag(f)
        if wire == 2:
            length = _varint(f)
            out[number] = f.read(length)
        else:
            _skip(f, wire)
    return out


# -- export ----------------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What `write_onnx` did: the file, its size, whether the size is dynamic, the largest relative difference
    between onnxruntime and PyTorch on the samples, and the seconds of each phase."""

    path: Path
    size_bytes: int
    dynamic: bool
    max_difference: float
    seconds: dict[str, float] = field(default_factory=dict)
    merge_difference: float | None = None  # LoRA merged: largest relative difference to the unmerged model


class _DynamicSizeError(ExportError):
    """The dynamic-size graph does not follow its input size."""


def write_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    outputs: Sequence[str],
    metadata: dict,
    size_multiple: int,
    min_size: int = 1,
    image_size: Sequence[int] | None = None,
    fallback_size: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    doc: str = "",
    what: str = "the model",
    extra_inputs: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] | None = None,
) -> ExportReport:
    """Export `module` (float32 images [B, 3, H, W] named `image` -> the tuple of `outputs`) as one verified
    ONNX file at `path`.

    Args:
        size_multiple: a dynamic size takes sides `k * size_multiple` (k >= 1, sides >= `min_size`).
        image_size: None for a dynamic spatial size, else the fixed (H, W).
        fallback_size: the fixed (H, W) to export instead when a dynamic size cannot be made exact (None: fail).
        metadata: JSON-serialisable values, stored with `input_size`, `opset` and `outputs` added.
        what: the model, in error messages.
        extra_inputs: inputs of a fixed-size graph after `image`, in order: name -> a function of a sample image
            batch and its index (0, 1) giving that input for it (its first dimension the batch); `module` takes
            them as positional arguments after the images.
    """
    start = time.perf_counter()
    extra_inputs = dict(extra_inputs or {})
    if extra_inputs and image_size is None:
        raise ExportError(f"export: the inputs {list(extra_inputs)} after the images need a fixed image size")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later")
    path = check_output_path(path)
    require_packages("onnx", "onnxruntime", "onnxscript", purpose="exporting to ONNX")
    metadata_props(metadata)  # fail before the slow part
    module.eval()
    write = functools.partial(_write, module, path, size_multiple=size_multiple, min_size=min_size, opset=opset,
                              outputs=tuple(outputs), metadata=metadata, doc=doc, what=what, start=start,
                              extra_inputs=extra_inputs)
    sample = _samples(None if image_size is None else tuple(image_size), size_multiple, min_size, extra_inputs)[0]
    with merged_lora(module, sample, outputs, what) as merge_difference:
        if image_size is not None:
            report = write(tuple(image_size))
        else:
            try:
                report = write(None)
            except _DynamicSizeError as e:
                if fallback_size is None:
                    raise ExportError(f"{e}; export a fixed size instead (--size H W)") from None
                logger.warning("export: a dynamic input size cannot be made exact (%s); exporting a fixed %d x %d "
                               "graph instead", e, *fallback_size)
                report = write(tuple(fallback_size))
    report.merge_difference = merge_difference
    return report


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's outputs (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


@contextlib.contextmanager
def merged_lora(module: nn.Module, sample: torch.Tensor | tuple, outputs: Sequence[str], what: str = "the model"):
    """Within the block, the LoRA adapters of `module`'s backbone are folded into its weights
    (`models.finetune.lora_merged`), once the merged module is checked to give the unmerged one's outputs on
    `sample` (images, or a tuple of the module's inputs) within `MERGE_TOLERANCE` (relative to each output's
    scale, as the ONNX verification); yields that
    difference, None when `module` holds no LoRA adapter (then nothing changes)."""
    from ..layers.lora import LoRALinear
    from ..models.finetune import lora_merged

    if not any(isinstance(m, LoRALinear) for m in module.modules()):
        yield None
        return
    args = sample if isinstance(sample, tuple) else (sample,)
    with torch.no_grad():
        before = module(*args)
    with lora_merged(module):
        with torch.no_grad():
            after = module(*args)
        worst = 0.0
        for i, (ref, out) in enumerate(zip(_tensors(before), _tensors(after))):
            name = outputs[i] if i < len(outputs) else str(i)
            if ref.numel() == 0:
                continue
            diff = float((out - ref).abs().max() / max(1.0, float(ref.abs().max())))
            if not diff <= MERGE_TOLERANCE:
                raise ExportError(f"output {name}: merging the LoRA adapters into the weights changes {what}'s output "
                                  f"by {diff:.2e} (relative), more than {MERGE_TOLERANCE:g}")
            worst = max(worst, diff)
        logger.info("export: LoRA adapters merged into the backbone's weights (outputs within %.1e of the unmerged "
                    "model)", worst)
        yield worst


def sample_sizes(size_multiple: int, min_size: int = 1) -> list[tuple[int, int]]:
    """Two small input sizes for tracing and verifying a dynamic graph: different aspect ratios, both sides
    multiples of `size_multiple` and at least `min_size` (a size baked in as a constant shows on the second)."""

    def side(pixels: int) -> int:
        pixels = max(pixels, min_size)
        return -(-pixels // size_multiple) * size_multiple

    return [(side(64), side(96)), (side(75), side(45))]


def _samples(fixed_size, size_multiple: int, min_size: int, extra_inputs=None) -> list[tuple[torch.Tensor, ...]]:
    """Two samples of the module's inputs: (images, *extra inputs), batch sizes 2 and 1."""
    sizes = sample_sizes(size_multiple, min_size) if fixed_size is None else [fixed_size, fixed_size]
    out = []
    for seed, (batch, size) in enumerate(zip((2, 1), sizes)):
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, 3, *size, generator=gen)
        out.append((images, *(make(images, seed) for make in (extra_inputs or {}).values())))
    return out


def _write(module, path: Path, fixed_size, *, size_multiple: int, min_size: int, opset: int, outputs, metadata: dict,
           doc: str, what: str, start: float, extra_inputs: dict) -> ExportReport:
    """One export attempt: `fixed_size` None for a dynamic size."""
    dynamic = fixed_size is None
    samples = _samples(fixed_size, size_multiple, min_size, extra_inputs)
    seconds = {}
    tick = time.perf_counter()
    try:
        program = _export_graph(module, samples[0], size_multiple if dynamic else None, min_size, opset, outputs,
                                list(extra_inputs))
    except Exception as e:
        logger.debug("torch.onnx.export failed", exc_info=True)
        if dynamic and ("Constraints violated" in str(e) or "specialized" in str(e)):
            raise _DynamicSizeError(f"torch.export specialised the input size: {first_line(e)}") from None
        raise ExportError(f"torch.onnx could not export {what}: {first_line(e)}") from None
    seconds["trace"] = time.perf_counter() - tick
    tick = time.perf_counter()
    with quiet_exporter():
        optimize_graph(program.model)
    seconds["optimize"] = time.perf_counter() - tick
    metadata = {**metadata, "input_size": "dynamic" if dynamic else list(fixed_size), "opset": opset,
                "outputs": list(outputs)}
    program.model.metadata_props.update(metadata_props(metadata))
    program.model.doc_string = doc
    anchor = _existing_ancestor(path.parent)
    try:
        with tempfile.TemporaryDirectory(dir=anchor, prefix=f".{path.name}.") as tmp:
            staged = Path(tmp) / path.name
            tick = time.perf_counter()
            program.save(str(staged))
            seconds["save"] = time.perf_counter() - tick
            tick = time.perf_counter()
            worst = _verify(staged, module, samples, outputs, dynamic, list(extra_inputs))
            seconds["verify"] = time.perf_counter() - tick
            path.parent.mkdir(parents=True, exist_ok=True)
            for p in Path(tmp).iterdir():  # external weights (graphs over 2 GB) first, the graph last
                if p != staged:
                    shutil.move(str(p), path.parent / p.name)
            staged.replace(path)
    except OSError as e:
        raise ExportError(f"{path}: cannot write it ({e.strerror or e})") from None
    seconds["total"] = time.perf_counter() - start
    report = ExportReport(path, path.stat().st_size, dynamic, worst, seconds)
    logger.info("export: wrote %s (%.1f MB, %s input size, onnxruntime within %.1e of PyTorch) in %.1f s (trace %.1f s, "
                "optimise %.1f s, verify %.1f s)", path, report.size_bytes / 1e6, "dynamic" if dynamic else "fixed",
                worst, seconds["total"], seconds["trace"], seconds["optimize"], seconds["verify"],
                extra={"export_report": report})
    return report


def _export_graph(module: nn.Module, sample: tuple[torch.Tensor, ...], multiple: int | None, min_size: int, opset: int,
                  outputs, extra_names: Sequence[str] = ()):
    """The ONNXProgram, unoptimised; `multiple` None = fixed spatial size (the sample's), else sides k * multiple.
    `sample`: the images, then the inputs `extra_names` (batched with them)."""
    batch = torch.export.Dim("batch", min=1)
    dims = {0: batch}
    if multiple is not None:
        least = max(1, -(-min_size // multiple))
        dims.update({2: multiple * torch.export.Dim("h", min=least), 3: multiple * torch.export.Dim("w", min=least)})
    names = [INPUT, *extra_names]
    with quiet_exporter(), torch.no_grad():
        return torch.onnx.export(
            module,
            tuple(sample),
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=list(outputs),
            dynamic_shapes={INPUT: dims, **{name: {0: batch} for name in extra_names}},
            optimize=False,
            verbose=False,
        )


def optimize_graph(model) -> None:
    """onnxscript's optimiser (`optimize_ir`: inlining, constant folding, dead-code removal, constants lifted to
    deduplicated initialisers, common subexpressions merged) without its pattern rewriter, which tries its 46
    rules at every node, twice: a fifth of the tiny Mask2Former's export time, for 5% fewer nodes and no gain in
    onnxruntime's speed (its own graph optimisations at load time do the same rewrites)."""
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants_ir

    common.InlinePass()(model)
    for _ in range(2):  # folding exposes more folding once the dead branches are gone
        if not fold_constants_ir(model, onnx_shape_inference=True).modified:
            break
        common.RemoveUnusedNodesPass()(model)
    for step in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
                 common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
                 common.CommonSubexpressionEliminationPass(), common.RemoveUnusedNodesPass(), common.OutputFixPass(),
                 common.NameFixPass()):
        step(model)


def _verify(path: Path, module: nn.Module, samples: Sequence[tuple], outputs, dynamic: bool, extra_names=()) -> float:
    """Largest |onnxruntime - PyTorch| over the outputs and samples, relative to each output's scale (>= 1);
    raises ExportError naming the output, sample and difference when it is above VERIFY_TOLERANCE (a
    `_DynamicSizeError` when only a dynamic graph's second sample differs)."""
    (onnx, ort) = require_packages("onnx", "onnxruntime", purpose="verifying an ONNX export")
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, x in enumerate(samples):
        try:
            worst = max(worst, _compare(session, module, x, outputs, extra_names))
        except ExportError as e:
            if dynamic and i > 0:
                raise _DynamicSizeError(f"the graph does not follow the input size: {e}") from None
            raise
    return worst


def _compare(session, module: nn.Module, inputs: tuple[torch.Tensor, ...], outputs, extra_names=()) -> float:
    x = inputs[0]
    with torch.no_grad():
        expected = module(*inputs)
    try:
        got = session.run(list(outputs), {name: t.numpy() for name, t in zip([INPUT, *extra_names], inputs)})
    except Exception as e:
        raise ExportError(f"onnxruntime failed on a {list(x.shape)} input: {first_line(e)}") from None
    worst = 0.0
    for name, ref, out in zip(outputs, expected, got):
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
