"""ONNX export of a ViT-S/16 linear segmentor: export time, file size, onnxruntime vs PyTorch CPU latency.

The `dinov3_vits16` architecture with random weights and the official linear head (last layer, BatchNorm, 150
classes), exported with a dynamic input size (`export_onnx`, which includes the onnx.checker + onnxruntime
verification). Latency: one 512 x 512 image, class scores at the input resolution (PyTorch `predict` vs the
graph's `class_scores` through `OnnxSegmentor`), median of `--repeats` runs after one warm-up, both runtimes
on the same number of threads.

    .venv/bin/python benchmarks/export_onnx.py [--threads 2] [--size 512] [--repeats 5]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dinoseg.eval.segmentation.export import deployment_metadata, export_onnx
from dinoseg.eval.segmentation.models import build_segmentation_decoder
from dinoseg.eval.segmentation.onnx_runtime import OnnxSegmentor
from dinoseg.models.backbones import make_backbone


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_segmentation_decoder(make_backbone("dinov3_vits16", pretrained=False), "LAST",
                                       decoder_type="linear", num_classes=150).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vits16_linear.onnx"
        start = time.perf_counter()
        export_onnx(model, path, metadata=deployment_metadata())
        export_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 2**20
        onnx_model = OnnxSegmentor(path, threads=args.threads)
        x = torch.randn(1, 3, args.size, args.size)
        hw = (args.size, args.size)
        with torch.no_grad():
            torch_s = median_time(lambda: model.predict(x, rescale_to=hw), args.repeats)
        ort_s = median_time(lambda: onnx_model.predict(x, rescale_to=hw), args.repeats)
        diff = (onnx_model.predict(x, rescale_to=hw) - model.predict(x, rescale_to=hw)).abs().max().item()
    print(f"ViT-S/16 + linear head (150 classes), dynamic input size, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"export (trace + ONNX + verification): {export_s:.1f} s; file: {size_mb:.1f} MiB")
    print(f"{args.size}x{args.size}, batch 1: PyTorch {1000 * torch_s:.0f} ms, onnxruntime {1000 * ort_s:.0f} ms "
          f"({torch_s / ort_s:.2f}x); max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
