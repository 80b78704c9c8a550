"""ONNX export of every task and head: export time (by phase), file size, onnxruntime vs PyTorch CPU latency and
largest difference.

Models (random weights; the architectures are what matters):
- seg-linear: `dinov3_vits16` + the official linear head (last layer, BatchNorm, 150 classes);
- seg-m2f: the test suite's tiny ViT (4 blocks, width 32) + ViT-Adapter + Mask2Former (hidden 32, 4 queries), as
  exported by tests/test_export.py;
- convnext-linear: `dinov3_convnext_tiny` + a linear head on its last stage (150 classes);
- convnext-m2f: a tiny ConvNeXt (one block per stage, widths 8-32) + Mask2Former on its stages;
- depth-linear: `dinov3_vits16` + a linear depth head (last layer, 256 bins);
- depth-dpt: `dinov3_vits16` + a DPT head (4 layers, 64 channels, 256 bins).
Each is exported with a dynamic input size (`--fixed`: also the fixed `--size`); the export includes the
onnx.checker + onnxruntime verification. Phases: trace = torch.export + its decomposition + the translation to
ONNX; optimise = constant folding and clean-up; verify = checker + onnxruntime on two sample batches. Latency: one
`--size` x `--size` image, whole-image inference (segmentation: `make_inference`, class probabilities; depth: the
depther's output), median of `--repeats` runs after a warm-up, both runtimes on `--threads` threads.
`--onnxscript-optimizer` runs onnxscript's whole optimiser (with its pattern rewriter) instead of dinoseg's, for
comparison.

    .venv/bin/python benchmarks/export_onnx.py [--models seg-m2f depth-dpt ...] [--threads 2] [--size 256] [--fixed]
"""

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dinoseg.engine import export as engine_export
from dinoseg.eval.depth.export import deployment_metadata as depth_metadata
from dinoseg.eval.depth.export import export_onnx as export_depther
from dinoseg.eval.depth.models import build_depther
from dinoseg.eval.depth.onnx_runtime import OnnxDepther
from dinoseg.eval.segmentation.export import deployment_metadata, export_onnx
from dinoseg.eval.segmentation.inference import make_inference
from dinoseg.eval.segmentation.models import AdapterOptions, Mask2FormerOptions, build_segmentation_decoder
from dinoseg.eval.segmentation.onnx_runtime import OnnxSegmentor
from dinoseg.models.backbones import make_backbone
from dinoseg.models.convnext import ConvNeXt
from dinoseg.models.vision_transformer import DinoVisionTransformer

TINY_VIT = dict(patch_size=16, embed_dim=32, depth=4, num_heads=2, n_storage_tokens=4, layerscale_init=1e-5,
                mask_k_bias=True, pos_embed_rope_dtype="fp32")
M2F_OPTIONS = dict(num_queries=4, nheads=2, dim_feedforward=32, enc_layers=1, dec_layers=2, pixel_decoder_nheads=2)
# tests/test_export.py's Mask2Former: the ViT-Adapter narrowed too.
TINY_M2F = dict(hidden_dim=32, m2f_options=Mask2FormerOptions(
    **M2F_OPTIONS, adapter=AdapterOptions(deform_num_heads=2, conv_inplane=16, with_cp=False)))
CONVNEXT_M2F = dict(hidden_dim=32, m2f_options=Mask2FormerOptions(**M2F_OPTIONS))


def vits16():
    return make_backbone("dinov3_vits16", pretrained=False)


MODELS = {
    # name: (task, builder)
    "seg-linear": ("segmentation", lambda: build_segmentation_decoder(vits16(), "LAST", "linear", num_classes=150)),
    "seg-m2f": ("segmentation", lambda: build_segmentation_decoder(DinoVisionTransformer(**TINY_VIT), "FOUR_EVEN_INTERVALS",
                                                                   "m2f", num_classes=6, **TINY_M2F)),
    "convnext-linear": ("segmentation", lambda: build_segmentation_decoder(
        make_backbone("dinov3_convnext_tiny", pretrained=False), "LAST", "linear", num_classes=150)),
    "convnext-m2f": ("segmentation", lambda: build_segmentation_decoder(
        ConvNeXt(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32]), "FOUR_LAST", "m2f", num_classes=6, **CONVNEXT_M2F)),
    "depth-linear": ("depth", lambda: build_depther(vits16(), "LAST", 256, head_type="linear", use_batchnorm=True)),
    "depth-dpt": ("depth", lambda: build_depther(vits16(), "FOUR_EVEN_INTERVALS", 256, head_type="dpt", channels=64,
                                                 post_process_channels=[48, 96, 192, 384])),
}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Reports(logging.Handler):
    """Collects the `ExportReport` that `write_onnx` logs with its last line."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reports = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "export_report"):
            self.reports.append(record.export_report)


def onnxscript_optimizer(model) -> None:
    """What `torch.onnx.export(optimize=True)` runs: onnxscript's optimiser with its pattern rewriter."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    onnxscript.optimizer.optimize_ir(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def bench(name: str, size: int, fixed: bool, threads: int, repeats: int, folder: Path, reports: Reports) -> str:
    task, build = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    path = folder / f"{name}.onnx"
    image_size = (size, size) if fixed else None
    start = time.perf_counter()
    if task == "segmentation":
        mode = "slide" if fixed else "whole"
        export_onnx(model, path, image_size=image_size,
                    metadata=deployment_metadata(inference_mode=mode, crop_size=size, stride=size // 2))
        runtime = OnnxSegmentor(path, threads=threads)
        args = dict(rescale_to=(size, size), crop_size=(size, size), stride=(size, size))
        torch_run, onnx_run = (lambda: make_inference(x, model, **args)), (lambda: make_inference(x, runtime, **args))
    else:
        export_depther(model, path, image_size=image_size,
                       metadata=depth_metadata(img_size=[size, size] if fixed else None))
        runtime = OnnxDepther(path, threads=threads)
        torch_run, onnx_run = (lambda: model(x)), (lambda: runtime(x))
    export_s = time.perf_counter() - start
    report = reports.reports[-1]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch_s = median_time(torch_run, repeats)
        ort_s = median_time(onnx_run, repeats)
        ref, ours = torch_run(), onnx_run()
    diff = (ours - ref).abs().max().item()
    phases = report.seconds
    return (f"| {name} | {'fixed' if fixed else 'dynamic'} | {export_s:.1f} | {phases['trace']:.1f} | "
            f"{phases['optimize']:.1f} | {phases['verify']:.1f} | {report.size_bytes / 2**20:.1f} | "
            f"{1000 * torch_s:.0f} | {1000 * ort_s:.0f} | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=256, help="latency input side (and the fixed size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fixed", action="store_true", help="also export each model with a fixed size")
    parser.add_argument("--onnxscript-optimizer", action="store_true",
                        help="onnxscript's whole optimiser (with its rewriter) instead of dinoseg's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reports = Reports()
    logging.getLogger("dinoseg").addHandler(reports)
    logging.getLogger("dinoseg").setLevel(logging.INFO)
    if args.onnxscript_optimizer:
        engine_export.optimize_graph = onnxscript_optimizer
    print(f"torch {torch.__version__}, {args.threads} thread(s), latency at {args.size}x{args.size}, batch 1"
          f"{', onnxscript optimiser' if args.onnxscript_optimizer else ''}")
    print("| model | size | export s | trace s | optimise s | verify s | MiB | PyTorch ms | onnxruntime ms | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for fixed in (False, True) if args.fixed else (False,):
                print(bench(name, args.size, fixed, args.threads, args.repeats, Path(tmp), reports), flush=True)


if __name__ == "__main__":
    main()
