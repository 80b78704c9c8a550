"""Backbone adaptation on the demo sets: frozen vs LoRA vs the last blocks, same iterations and seed.

    python benchmarks/finetune.py [--tasks segmentation depth] [--modes frozen lora blocks] [--iters N] [--seed 0]

Each run is `dinoseg train demo.yaml` (segmentation) or `dinoseg train demo_depth.yaml` (depth) with
`model.finetune.mode=<mode>` (the other `model.finetune` keys at their defaults: LoRA rank 8 on qkv and proj, the last
2 blocks, backbone lr x 0.1), in its own process. Columns: the final metric (segmentation: validation mIoU, higher is
better; depth: test RMSE in metres with the demo's flip TTA, lower is better), the median seconds per training step
(validation left out), the process's peak resident memory, the size of `checkpoint_last.pth` (head, adapted tensors,
optimizer state, RNG states, config) and the backbone tensors it holds, and the number of backbone parameters that
train. `--iters` shortens the runs (default: the demos' 500 and 800 iterations).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMOS = {"segmentation": ("demo.yaml", 500), "depth": ("demo_depth.yaml", 800)}


def run(task: str, mode: str, out: Path, iters: int | None, seed: int) -> dict:
    config, default_iters = DEMOS[task]
    total = iters or default_iters
    args = [config, f"output_dir={out}", f"model.finetune.mode={mode}", f"seed={seed}", f"scheduler.total_iter={total}",
            f"eval.eval_interval={total}", f"train.checkpoint_interval={total}", "train.log_interval=10"]
    if iters and iters <= 20:
        args.append("scheduler.warmup_iters=1")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # stderr to a file, not a pipe: the progress bars would fill a pipe nobody reads before the run ends.
    with open(out.parent / f"{out.name}.stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dinoseg.cli", "train", *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{task} {mode}: dinoseg train failed:\n{err.read()[-3000:]}")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stamps = [(r["iteration"], r["seconds"]) for r in log if "loss" in r]
    # Per-step time between logs, the first interval (warm-up) and the last one (it may hold the validation) left out.
    steps = [(t1 - t0) / (i1 - i0) for (i0, t0), (i1, t1) in zip(stamps[1:-2], stamps[2:-1])] or [stamps[-1][1] / total]
    checkpoint = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    record = checkpoint.get("backbone")
    backbone_keys = [k for k in checkpoint["model"] if ".backbone." in k or ".feature_model." in k]
    if task == "segmentation":
        metric = json.loads((out / "results-semantic-segmentation.json").read_text())["mIoU"]
    else:
        metric = json.loads((out / "results-depth.json").read_text())["rmse"]
    return {
        "metric": metric,
        "step": statistics.median(steps),
        "rss": usage.ru_maxrss / 1024,  # KiB -> MiB
        "checkpoint": (out / "checkpoint_last.pth").stat().st_size / 1024,
        "adapted": sum(checkpoint["model"][k].numel() * checkpoint["model"][k].element_size()
                       for k in backbone_keys) / 1024,
        "trained": sum(checkpoint["model"][k].numel() for k in backbone_keys),
        "mode": record["finetune"]["mode"] if record else "frozen",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(DEMOS), choices=list(DEMOS))
    p.add_argument("--modes", nargs="+", default=["frozen", "lora", "blocks"], choices=["frozen", "lora", "blocks"])
    p.add_argument("--iters", type=int, default=None, help="iterations of every run (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, "
          f"load average at start {os.getloadavg()[0]:.1f}, torch {torch.__version__}, seed {args.seed}")
    header = ("| task | mode | iterations | metric | s / step | peak RSS (MiB) | checkpoint (KiB) | backbone tensors in it "
              "(KiB) | backbone parameters trained |")
    print(header)
    print("|" + "---|" * 9)
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            for mode in args.modes:
                r = run(task, mode, Path(tmp) / f"{task}_{mode}", args.iters, args.seed)
                name = "mIoU" if task == "segmentation" else "RMSE (m)"
                print(f"| {task} | {mode} | {args.iters or DEMOS[task][1]} | {name} {r['metric']:.4f} | {r['step']:.3f} | "
                      f"{r['rss']:.0f} | {r['checkpoint']:.0f} | {r['adapted']:.0f} | {r['trained']:,} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
