"""Training loop for a segmentation head on a frozen DINOv3 backbone (one process or many under torchrun).

Read it top to bottom: set-up, data, model, optimisation objects, optional resume, then the iteration loop
(train step, periodic validation, periodic checkpoint) and the final report.
"""

import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ... import distributed
from ..utils import FROZEN_BACKBONE
from .checkpointer import (
    BEST,
    LAST,
    frozen_prefixes,
    load_checkpoint,
    load_head_state_dict,
    restore_rng,
    save_checkpoint,
)
from .config import Precision, save_config
from .eval import evaluate_segmentation_model, make_val_loader, write_results
from .loss import MultiSegmentationLoss
from .sampling import EpochSeededDataset, InfiniteShardedSampler
from .schedulers import build_scheduler
from .setup import build_model, build_optimizer, build_train_dataset, build_val_dataset

logger = logging.getLogger("dinoseg")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says why and what was kept."""


def prepare_output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output_dir={path!r} is not writable ({e.strerror})") from None
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_train_mode(model: torch.nn.Module) -> None:
    """Head (and adapter) in train mode; the frozen backbone always in eval mode."""
    model.train()
    for module in model.modules():
        if getattr(module, FROZEN_BACKBONE, False):
            module.eval()


def wrap_distributed(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP over the trainable part only: the frozen backbone is neither broadcast nor all-reduced."""
    if not distributed.is_enabled():
        return model
    model = distributed.convert_sync_batchnorm(model, device)
    frozen = tuple(frozen_prefixes(model))
    ignored = [n for n, _ in model.named_parameters() if n.startswith(frozen)]
    ignored += [n for n, _ in model.named_buffers() if n.startswith(frozen)]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def build_criterion(cfg: DictConfig, num_classes: int):
    if cfg.decoder_head.type == "m2f":
        from .m2f_loss import Mask2FormerLoss

        c = cfg.train.m2f_loss
        return Mask2FormerLoss(
            num_classes=num_classes, class_weight=c.class_weight, mask_weight=c.mask_weight,
            dice_weight=c.dice_weight, no_object_weight=c.no_object_weight, train_num_points=c.train_num_points,
            oversample_ratio=c.oversample_ratio, importance_sample_ratio=c.importance_sample_ratio,
            deep_supervision=c.deep_supervision, ignore_index=255,
        )
    return MultiSegmentationLoss(
        diceloss_weight=cfg.train.diceloss_weight, celoss_weight=cfg.train.celoss_weight, ignore_index=255
    )


def compute_loss(criterion, outputs, labels: torch.Tensor, head_type: str) -> torch.Tensor:
    if head_type == "m2f":
        loss, _ = criterion(outputs, labels)
        return loss
    # Linear logits live on the patch grid: upsample them to the label resolution, in float32.
    logits = F.interpolate(outputs.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return criterion(logits, labels)


class MetricsLog:
    """metrics.jsonl (and optionally TensorBoard), written by rank 0 only."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, iteration: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **values}, default=float) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, iteration)
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{k}/{kk}", vv, iteration)

    def truncate_after(self, iteration: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= iteration]
        self.path.write_text("".join(ln + "\n" for ln in lines))


def train_segmentation(cfg: DictConfig) -> dict:
    # 1. Processes, devices, output directory, seeds.
    device = distributed.setup(cfg.device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    precision = Precision(cfg.precision)
    if precision == Precision.FLOAT16 and device.type != "cuda":
        raise TrainingError("precision=float16 needs CUDA (gradient scaling); use bfloat16 on CPU")
    if cfg.train.batch_size % world:
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} does not split over {world} processes")
    out = prepare_output_dir(cfg.output_dir) if rank == 0 else Path(cfg.output_dir)
    distributed.barrier()
    if rank == 0:
        save_config(cfg, out)
    seed_everything(cfg.seed + rank)

    # 2. Data: an endless, resumable stream of augmented training batches; a sharded validation set.
    train_set = build_train_dataset(cfg)
    val_set = build_val_dataset(cfg)
    num_classes = cfg.decoder_head.num_classes or train_set.num_classes
    class_names = getattr(val_set, "class_names", None)

    # 3. Model, loss, optimiser over trainable parameters only, schedule, gradient scaler.
    model = build_model(cfg, num_classes).to(device)
    criterion = build_criterion(cfg, num_classes).to(device)
    optimizer = build_optimizer(model, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = build_scheduler(optimizer, cfg.scheduler)
    scaler = torch.amp.GradScaler("cuda") if precision == Precision.FLOAT16 else None
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)

    # 4. Resume from the last checkpoint if asked (and present).
    start_iter, best = 0, {}
    last_path = out / LAST
    if cfg.train.resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        load_head_state_dict(model, ckpt["model"], source=str(last_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        start_iter, best = int(ckpt["iteration"]), dict(ckpt["best"])
        logger.info("resumed from %s at iteration %d", last_path, start_iter)
    log = MetricsLog(out, cfg.train.tensorboard, enabled=rank == 0)
    log.truncate_after(start_iter)

    per_process = cfg.train.batch_size // world
    sampler = InfiniteShardedSampler(len(train_set), seed=cfg.seed, rank=rank, world_size=world,
                                     start=start_iter * per_process)
    train_loader = iter(torch.utils.data.DataLoader(
        EpochSeededDataset(train_set, cfg.seed), batch_size=per_process, sampler=sampler,
        num_workers=cfg.train.num_workers, drop_last=True, persistent_workers=cfg.train.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed + rank),  # keeps the global RNG untouched
    ))
    val_loader = make_val_loader(val_set, cfg)

    train_model = wrap_distributed(model, device)
    set_train_mode(train_model)
    if start_iter:
        restore_rng(ckpt)  # last, so nothing above shifts the restored stream (dropout draws from it)
    total = cfg.scheduler.total_iter
    metric_name = cfg.eval.metric_to_save
    results = {}
    # Redraw a progress bar at most every few seconds when the output is a log file, not a terminal.
    bar = tqdm(total=total, initial=start_iter, desc="train", disable=rank != 0, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)
    t0 = time.perf_counter()
    window: list[float] = []  # losses since the last log line

    # 5. The loop.
    for iteration in range(start_iter, total):
        images, labels = next(train_loader)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).long()

        outputs = train_model(images)
        loss = compute_loss(criterion, outputs, labels, cfg.decoder_head.type)
        loss_value = distributed.all_reduce_sum(loss.detach().float().clone()).item() / world
        if not math.isfinite(loss_value):
            kept = f"last checkpoint kept: {last_path}" if last_path.exists() else "no checkpoint written yet"
            raise TrainingError(f"loss is {loss_value} at iteration {iteration}; training stopped ({kept})")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.optimizer.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.gradient_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        done = iteration + 1
        window.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if done % cfg.train.log_interval == 0 or done == total:
            # The mean over the logging window: single-batch losses are too noisy to read a curve from.
            log.write(done, loss=sum(window) / len(window), lr=lr, seconds=time.perf_counter() - t0)
            window.clear()

        if done % cfg.eval.eval_interval == 0 or done == total:
            results = evaluate_segmentation_model(model, val_loader, cfg, num_classes, device, class_names)
            set_train_mode(train_model)
            log.write(done, val={k: v for k, v in results.items() if isinstance(v, float)})
            if rank == 0:
                logger.info("iteration %d: %s=%.4f", done, metric_name, results[metric_name])
            if results[metric_name] > best.get(metric_name, -math.inf):
                best = {k: v for k, v in results.items() if isinstance(v, float)} | {"iteration": done}
                save_checkpoint(out / BEST, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                iteration=done, best=best, config_yaml=config_yaml)
        if done % cfg.train.checkpoint_interval == 0 or done == total:
            save_checkpoint(last_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            iteration=done, best=best, config_yaml=config_yaml)
    bar.close()

    # 6. Final report (rank 0).
    if rank == 0 and results:
        write_results(results, out)
    distributed.barrier()
    return results
