"""Sliding-window inference speed and memory of a small-backbone ViT-Adapter + Mask2Former segmentor.

A ViT-S/16-sized DINOv3 backbone (embed 384, depth 12, 6 heads, MLP, 4 storage tokens; random weights), the
ViT-Adapter, and a Mask2Former head with the official counts (100 queries, 16 heads, FFN 4096, 6 encoder and
9 decoder layers) at a reduced `--hidden-dim` (official: 2048), 150 classes; ADE20K-style slide inference
(crop 512, stride 341) on a 512 x 683 image. For each deformable-attention implementation it reports
  - images/s (median of `--repeats` timed runs after one warm-up),
  - peak memory: on CPU the peak resident set size (sampled every 2 ms from /proc/self/statm) above the level
    before the call; on CUDA `max_memory_allocated` above the memory in use,
  - the share of time spent in deformable attention: in the sampling core (`ms_deform_attn_core`) and in
    the whole `MSDeformAttn` modules (projections included).

    .venv/bin/python benchmarks/m2f_inference.py [--hidden-dim 256] [--impls auto,gather,grid_sample] [--threads 1]

On a shared machine, one thread gives the steadiest numbers (two threads slow down several-fold whenever
another process takes a core).
"""

import argparse
import statistics
import time

import torch
from _memory import measure

from dinoseg.eval.segmentation.inference import slide_inference
from dinoseg.eval.segmentation.models import Mask2FormerOptions, build_segmentation_decoder
from dinoseg.eval.segmentation.models.utils import ms_deform_attn
from dinoseg.models.vision_transformer import DinoVisionTransformer

VITS16 = dict(
    patch_size=16,
    embed_dim=384,
    depth=12,
    num_heads=6,
    ffn_ratio=4,
    ffn_layer="mlp",
    n_storage_tokens=4,
    layerscale_init=1e-5,
    norm_layer="layernormbf16",
    mask_k_bias=True,
    pos_embed_rope_dtype="fp32",
)


class DeformTimer:
    """Accumulates the time spent in `ms_deform_attn_core` and in `MSDeformAttn.forward`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.core = self.module = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __enter__(self):
        core, module_forward = ms_deform_attn.ms_deform_attn_core, ms_deform_attn.MSDeformAttn.forward
        self._saved = core, module_forward

        def timed_core(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = core(*args, **kwargs)
            self._sync()
            self.core += time.perf_counter() - start
            return out

        def timed_forward(module, *args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = module_forward(module, *args, **kwargs)
            self._sync()
            self.module += time.perf_counter() - start
            return out

        ms_deform_attn.ms_deform_attn_core = timed_core  # MSDeformAttn.forward looks it up at call time
        ms_deform_attn.MSDeformAttn.forward = timed_forward
        return self

    def __exit__(self, *exc):
        ms_deform_attn.ms_deform_attn_core, ms_deform_attn.MSDeformAttn.forward = self._saved


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512x683", help="HxW input size")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--stride", type=int, default=341)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--dim-feedforward", type=int, default=4096)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--crop-batch-size", type=int, default=2)
    parser.add_argument("--impls", default="auto,gather,grid_sample", help="deformable attention paths to time")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (the median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(**VITS16)
    segmentor = build_segmentation_decoder(
        backbone,
        decoder_type="m2f",
        hidden_dim=args.hidden_dim,
        num_classes=args.num_classes,
        m2f_options=Mask2FormerOptions(dim_feedforward=args.dim_feedforward),
    )
    segmentor = segmentor.to(device).eval()
    height, width = (int(v) for v in args.size.split("x"))
    x = torch.randn(1, 3, height, width, device=device)
    crop, stride = (args.crop, args.crop), (args.stride, args.stride)
    deform_modules = [m for m in segmentor.modules() if isinstance(m, ms_deform_attn.MSDeformAttn)]

    if device.type == "cpu":
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    else:
        print(f"device: {torch.cuda.get_device_name()}")
    print(
        f"ViT-S/16 + ViT-Adapter + Mask2Former (hidden {args.hidden_dim}, FFN {args.dim_feedforward}, official counts), "
        f"random weights, {args.num_classes} classes; slide {height}x{width}, crop {args.crop}, stride {args.stride}, "
        f"crop batch {args.crop_batch_size}; median of {args.repeats} runs"
    )
    print(f"{'impl':>12} {'images/s':>9} {'s/image':>8} {'peak MiB':>9} {'core %':>7} {'MSDeformAttn %':>15}")
    for impl in args.impls.split(","):
        for m in deform_modules:
            m.impl = impl

        def infer():
            slide_inference(x, segmentor, crop_size=crop, stride=stride, crop_batch_size=args.crop_batch_size)

        with torch.no_grad():
            infer()  # warm-up
            runs = [measure(infer, device) for _ in range(args.repeats)]
            with DeformTimer(device) as timer:
                start = time.perf_counter()
                infer()
                total = time.perf_counter() - start
        seconds = statistics.median(t for t, _ in runs)
        peak = max(m for _, m in runs) / 2**20
        print(
            f"{impl:>12} {1 / seconds:>9.3f} {seconds:>8.2f} {peak:>9.0f} {100 * timer.core / total:>7.1f} "
            f"{100 * timer.module / total:>15.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
