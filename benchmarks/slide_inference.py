"""Overhead of `slide_inference` over the bare batched model forward on the same crops.

A ViT-S/16-sized backbone (embed 384, depth 12, 6 heads, MLP, 4 storage tokens; random weights) with a
150-class linear head, crop 512, stride 341. For each input size it times
  - slide:     `slide_inference(x, segmentor, crop_size=, stride=, crop_batch_size=, n_output_channels=)` (crop, batch,
               predict, accumulate) returning a freshly allocated [1, 150, H, W] float32 result,
  - slide+buf: the same, taking the accumulator from an `AccumulatorBuffer` kept across calls (what dinoseg's
               eval and predict loops do),
  - model:     `segmentor.predict` over the same crops, pre-stacked in the same batches, outputs discarded,
and prints the ratios to the bare model (target <= 1.05) and the peak memory of each: on CUDA
`torch.cuda.max_memory_allocated` above the memory in use before the call; on CPU the peak resident set size
(RSS, sampled every 2 ms from /proc/self/statm) above the RSS before the call.

Timings are the minimum over `--repeats` interleaved runs (other processes on a shared machine only ever add
time). Because such interference can still differ between the runs compared, the "in-run" columns also give,
for the same slide runs, total time / time spent inside the model's `predict` (median over runs): the
orchestration overhead measured without comparing separate runs.

On CPU virtual machines first-touching freshly allocated memory is expensive (the 1.2 GiB result at 1024x2048
costs 0.3-2 s here, depending on what the host has reclaimed), which is what separates the two slide columns;
the "alloc s" column is that cost alone. A last line says whether the kernel reports freed memory to the host
(/sys/module/page_reporting, as virtual machines with free page reporting do): memory freed by one call then has
to be supplied by the host again when the next call allocates.

Each size gets at least `--min-seconds` of timed rounds (cheap sizes many more than `--repeats`), as a minimum
over few runs is noisy at the 1-2% level compared here; the default run takes about 11 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/slide_inference.py [--repeats 5] [--crop-batch-size 8] [--device cpu]
"""

import argparse
import functools
import statistics
import time

import torch
from _memory import measure

from dinoseg.eval.segmentation.inference import AccumulatorBuffer, slide_crop_boxes, slide_inference
from dinoseg.eval.segmentation.models import build_segmentation_decoder
from dinoseg.models.backbones import make_backbone
from dinoseg.models.vision_transformer import DinoVisionTransformer

VITS16 = {
    "patch_size": 16,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 6,
    "ffn_ratio": 4,
    "ffn_layer": "mlp",
    "n_storage_tokens": 4,
    "layerscale_init": 1e-5,
    "norm_layer": "layernormbf16",
    "mask_k_bias": True,
    "pos_embed_rope_dtype": "fp32",
}


class TimedPredict(torch.nn.Module):
    """Wraps a segmentor and adds up the wall time spent in its `predict`."""

    def __init__(self, segmentor: torch.nn.Module):
        super().__init__()
        self.segmentor = segmentor
        self.seconds = 0.0

    def predict(self, x, rescale_to):
        start = time.perf_counter()
        out = self.segmentor.predict(x, rescale_to=rescale_to)
        if out.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


PAGE_REPORTING = "/sys/module/page_reporting/parameters"


def page_reporting() -> str | None:
    """How this kernel reports freed memory to its host, or None where it does not."""
    try:
        with open(f"{PAGE_REPORTING}/reported_kib") as f:
            reported = int(f.read()) / 2**20
        with open(f"{PAGE_REPORTING}/page_reporting_order") as f:
            order = int(f.read())
    except (OSError, ValueError):
        return None
    return f"free blocks of {4 << order} KiB and more, {reported:.0f} GiB so far"


def make_runs(segmentor, x, batches, crop_hw, crop, stride, result_shape, options, in_run: dict) -> dict:
    """The timed callables (bare model, slide, slide with a kept buffer, first touch of a result), each with its
    results. The slide runs also append their total / in-model seconds to `in_run[name]`."""
    timed = TimedPredict(segmentor)
    buffer = AccumulatorBuffer()

    def bare():
        for batch in batches:
            segmentor.predict(batch, rescale_to=crop_hw)

    def run_slide(name, **extra):
        timed.seconds = 0.0
        start = time.perf_counter()
        slide_inference(x, timed, crop_size=crop, stride=stride, **options, **extra)
        in_run.setdefault(name, []).append((time.perf_counter() - start) / timed.seconds)

    def slide():
        run_slide("slide")

    def slide_buffer():
        run_slide("slide_buffer", buffer=buffer)

    def first_touch():  # what a fresh result costs by itself: allocate and write it once
        torch.empty(result_shape, device=x.device).fill_(0)

    return {fn: [] for fn in (bare, slide, slide_buffer, first_touch)}


def profile(fn, device) -> None:
    """The ten ops that take the most time in one call of `fn` (device time on CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=60), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512x683,1024x2048", help="comma-separated HxW input sizes")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--stride", type=int, default=341)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--crop-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, at least (the minimum is reported)")
    parser.add_argument("--min-seconds", type=float, default=240.0, help="timed rounds per size last at least this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="vits16", help="vits16 (the ViT-S/16 below) or a hub name, e.g. dinov3_vitl16")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype of the segmentor")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one slide call per size")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(**VITS16) if args.arch == "vits16" else make_backbone(args.arch, pretrained=False)
    segmentor = build_segmentation_decoder(backbone, "LAST", "linear", num_classes=args.num_classes,
                                           autocast_dtype=getattr(torch, args.precision)).to(device).eval()
    crop, stride = (args.crop, args.crop), (args.stride, args.stride)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    print(
        f"device: {device} ({torch.get_num_threads()} CPU threads)"
        if device.type == "cpu"
        else f"device: {torch.cuda.get_device_name()}"
    )
    print(
        f"{args.arch} random weights, {args.precision}, linear head {args.num_classes} classes, crop {args.crop}, "
        f"stride {args.stride}, "
        f"crop batch {args.crop_batch_size}, min of >= {args.repeats} interleaved runs"
    )
    memory_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS (sampled)"
    print(
        f"{'input':>10} {'crops':>5} {'model s':>8} {'slide s':>8} {'ratio':>6} {'in-run':>6} {'slide+buf s':>11}"
        f" {'ratio':>6} {'in-run':>6} {'model MiB':>9} {'slide MiB':>9} {'+buf MiB':>8} {'alloc s':>7} {'rounds':>6}"
    )
    with torch.no_grad():
        for height, width in sizes:
            x = torch.randn(1, 3, height, width, device=device)
            boxes = slide_crop_boxes(height, width, crop, stride)
            crop_hw = (boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2])
            crops = torch.stack([x[0, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
            batches = list(crops.split(args.crop_batch_size))
            result_shape = (1, args.num_classes, height, width)
            options = {"crop_batch_size": args.crop_batch_size, "n_output_channels": args.num_classes}

            in_run = {}
            runs = make_runs(segmentor, x, batches, crop_hw, crop, stride, result_shape, options, in_run)
            start = time.perf_counter()
            for fn in runs:  # warm-up (allocator, kernels)
                fn()
            rounds = max(args.repeats, int(args.min_seconds / (time.perf_counter() - start)))
            in_run.clear()
            for _ in range(rounds):  # interleaved, so that drifts hit all alike
                for fn, results in runs.items():
                    results.append(measure(fn, device))
            (t_bare, m_bare), (t_slide, m_slide), (t_out, m_out), (t_alloc, _) = (
                (min(t for t, _ in r), max(m for _, m in r) / 2**20) for r in runs.values()
            )
            r_slide, r_out = (statistics.median(in_run[k]) for k in ("slide", "slide_buffer"))
            print(
                f"{height:>4}x{width:<5} {len(boxes):>5} {t_bare:>8.3f} {t_slide:>8.3f} {t_slide / t_bare:>6.3f} "
                f"{r_slide:>6.3f} {t_out:>11.3f} {t_out / t_bare:>6.3f} {r_out:>6.3f} "
                f"{m_bare:>9.0f} {m_slide:>9.0f} {m_out:>8.0f} {t_alloc:>7.3f} {rounds:>6}",
                flush=True,
            )
            if args.profile:
                profile(functools.partial(slide_inference, x, segmentor, crop_size=crop, stride=stride, **options), device)
    print(
        f"memory: {memory_kind}, above the level before each call; alloc s: allocating and first-touching one "
        "result-sized float32 tensor; ratios: minimum time / minimum model time; in-run: median of total / in-model"
    )
    reporting = page_reporting() if device.type == "cpu" else None
    if reporting:
        print(f"this kernel hands freed memory back to its host (page reporting: {reporting})")


if __name__ == "__main__":
    main()
