"""Training-step overhead: a real `dinoseg train` iteration vs the bare model work on the same batch size.

    python benchmarks/train_step.py [--iters 12] [--size 512] [--batch 2] [--workers 1] [--hub dinov3_vits16]

"engine": median seconds per iteration of `train_segmentation` (data loading + augmentation, forward, loss,
backward, clipping, optimizer, scheduler, logging), read from its metrics log with log_interval=1.
"bare": median of (frozen backbone forward + linear head forward + CE loss + backward) on one fixed batch.
Target (issue 5): engine / bare <= 1.10 for ViT-S/16, batch 2 at 512.
"""

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoseg.eval.segmentation.config import load_config
from dinoseg.eval.segmentation.setup import build_model
from dinoseg.eval.segmentation.train import train_segmentation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--hub", default="dinov3_vits16")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warm = 2
    total = args.iters + warm
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([], [
            f"model.dino_hub={args.hub}", "model.random_init=true",
            f"datasets.train=Synthetic:split=TRAIN:num_samples=64:image_size={args.size}",
            f"datasets.val=Synthetic:split=VAL:num_samples=1:image_size={args.size}",
            f"transforms.train.img_size={args.size}", f"transforms.train.crop_size={args.size}",
            f"transforms.eval.img_size={args.size}",
            f"train.batch_size={args.batch}", f"train.num_workers={args.workers}", "train.log_interval=1",
            f"train.checkpoint_interval={total}", f"scheduler.total_iter={total}", "scheduler.warmup_iters=1",
            f"eval.eval_interval={total}", f"eval.crop_size={args.size}", f"eval.stride={args.size}",
            f"output_dir={tmp}/run",
        ])
        train_segmentation(cfg)
        log = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        stamps = [r["seconds"] for r in log if "loss" in r]
        # The last logged step of a run includes the final evaluation: leave it out.
        engine = statistics.median(b - a for a, b in zip(stamps[warm:-2], stamps[warm + 1 : -1]))

        model = build_model(cfg, num_classes=6)
        model.train()
        model.segmentation_model[0].feature_model.eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        y = torch.randint(0, 6, (args.batch, args.size, args.size))
        bare_times = []
        for i in range(args.iters + warm):
            t0 = time.perf_counter()
            logits = model(x)
            loss = F.cross_entropy(F.interpolate(logits, size=y.shape[-2:], mode="bilinear"), y, ignore_index=255)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i >= warm:
                bare_times.append(time.perf_counter() - t0)
        bare = statistics.median(bare_times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.hub}, batch {args.batch} at {args.size}x{args.size}, {args.workers} loader worker(s), "
          f"{torch.get_num_threads()} threads")
    print(f"{'engine s/iter':>14} {'bare s/iter':>12} {'ratio':>7} {'peak RSS MiB':>13}")
    print(f"{engine:14.3f} {bare:12.3f} {engine / bare:7.3f} {peak:13.0f}")


if __name__ == "__main__":
    main()
