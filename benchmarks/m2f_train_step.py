"""Mask2Former training step: seconds per iteration, peak memory and the share spent in the loss.

    .venv/bin/python benchmarks/m2f_train_step.py [--config demo_m2f.yaml] [--iters 10] [--warmup 2]
        [--precisions float32,bfloat16] [--threads 1,2] [--device cpu|cuda] [key=value ...]

One training iteration of the engine on the config's model and data (default: the M2F demo): forward (frozen
backbone, ViT-Adapter, Mask2Former head, under the config's autocast), `Mask2FormerLoss` (Hungarian matching
of every decoder layer included), backward, gradient clipping, AdamW and scheduler steps. The batches are real
augmented training batches, loaded once before timing (data loading is not timed).

Each (precision, threads) setting runs in a fresh process, so the memory numbers are its own:
  - s/iter: median over `--iters` timed iterations after `--warmup` untimed ones;
  - loss %: share of the step in the loss, and in the Hungarian matcher alone (part of the loss);
  - peak RSS: the process's resident-set high-water mark (`resource.getrusage`), model building included;
  - CUDA peak: `torch.cuda.max_memory_allocated` over the timed iterations (CUDA only).
`train.deterministic=true` among the overrides measures the deterministic mode (bwd+opt %: backward, clipping,
optimizer and scheduler steps). On a machine shared with other jobs, compare settings from the same invocation only.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoseg.engine.config import scheduler_kwargs  # noqa: E402
from dinoseg.engine.schedulers import build_scheduler  # noqa: E402
from dinoseg.engine.training import make_deterministic  # noqa: E402
from dinoseg.eval.segmentation.config import load_config  # noqa: E402
from dinoseg.eval.segmentation.decoders import decoder, resolve_num_classes  # noqa: E402
from dinoseg.eval.segmentation.setup import build_model, build_optimizer, build_train_dataset  # noqa: E402
from dinoseg.models.frozen import set_train_mode  # noqa: E402


class Clock:
    """Wall time of code blocks; synchronises CUDA so queued kernels are counted where they were issued."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def measure(config: str, overrides: list[str], iters: int, warmup: int, device: str) -> dict:
    """Runs in the child process: one setting, returns its numbers."""
    cfg = load_config([config], overrides)
    if cfg.train.deterministic:
        make_deterministic()
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    dataset = build_train_dataset(cfg)
    num_classes = resolve_num_classes(cfg.decoder_head, dataset=dataset)
    model = build_model(cfg, num_classes).to(device)
    head = decoder(cfg.decoder_head)
    criterion = head.criterion(cfg.train, num_classes).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(cfg.scheduler.type, optimizer, cfg.optimizer.lr, cfg.scheduler.total_iter,
                                scheduler_kwargs(cfg.scheduler))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    set_train_mode(model)

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    batches = []
    for images, labels in loader:
        batches.append((images.to(device), labels.to(device).long()))
        if len(batches) == min(4, iters + warmup):
            break

    clock = Clock(device)
    matcher = criterion.criterion.matcher
    matcher_forward = matcher.forward
    matched = [0.0]

    def timed_matcher(*args, **kwargs):
        start = clock()
        out = matcher_forward(*args, **kwargs)
        matched[0] += clock() - start
        return out

    matcher.forward = timed_matcher  # instance attribute: nn.Module.__call__ finds it
    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iters):
        images, labels = batches[i % len(batches)]
        matched[0] = 0.0
        t0 = clock()
        outputs = model(images)
        t1 = clock()
        loss = head.loss(criterion, outputs, labels)
        t2 = clock()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at iteration {i} ({cfg.precision})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optimizer.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.gradient_clip)
        optimizer.step()
        scheduler.step()
        t3 = clock()
        if i == warmup - 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if i >= warmup:
            rows.append({"step": t3 - t0, "forward": t1 - t0, "loss": t2 - t1, "matcher": matched[0], "rest": t3 - t2})

    step = statistics.median(r["step"] for r in rows)
    return {
        "precision": cfg.precision.value,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "s_per_iter": step,
        "forward_share": statistics.median(r["forward"] / r["step"] for r in rows),
        "loss_share": statistics.median(r["loss"] / r["step"] for r in rows),
        "matcher_share": statistics.median(r["matcher"] / r["step"] for r in rows),
        "backward_share": statistics.median(r["rest"] / r["step"] for r in rows),
        "deterministic": bool(cfg.train.deterministic),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "batch": cfg.train.batch_size,
        "crop": cfg.transforms.train.crop_size,
        "last_loss": loss.item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo_m2f.yaml")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--threads", default=None, help="comma-separated CPU thread counts (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args()
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")

    if args.child:
        print(json.dumps(measure(args.config, args.overrides, args.iters, args.warmup, args.device)))
        return

    threads = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    results = []
    for precision in args.precisions.split(","):
        for n in threads:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--config",
                args.config,
                "--iters",
                str(args.iters),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
                *args.overrides,
                f"precision={precision}",
            ]
            env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n)) if n else None
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if done.returncode != 0:
                sys.exit(f"m2f_train_step: {precision} run failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    first = results[0]
    print(
        f"{' '.join([Path(args.config).name, *args.overrides])}: batch {first['batch']} at {first['crop']}x"
        f"{first['crop']}, {args.iters} timed iterations after {args.warmup} warm-up, device {first['device']}"
    )
    header = (
        f"{'precision':>9} {'determ.':>7} {'threads':>7} {'s/iter':>7} {'forward %':>9} {'loss %':>7} {'matcher %':>9} "
        f"{'bwd+opt %':>9} "
        f"{'peak RSS MiB':>12} {'CUDA peak MiB':>13}"
    )
    print(header)
    for r in results:
        cuda = f"{r['cuda_peak_mib']:13.0f}" if r["cuda_peak_mib"] is not None else f"{'-':>13}"
        print(
            f"{r['precision']:>9} {str(r['deterministic']):>7} {r['threads']:>7} {r['s_per_iter']:7.3f} "
            f"{100 * r['forward_share']:9.1f} {100 * r['loss_share']:7.1f} {100 * r['matcher_share']:9.1f} "
            f"{100 * r['backward_share']:9.1f} {r['peak_rss_mib']:12.0f} {cuda}"
        )


if __name__ == "__main__":
    main()
