"""Training loop for a segmentation head on a frozen DINOv3 backbone (one process or many under torchrun).

Read it top to bottom: set-up, data, model, optimisation objects, optional resume, then the iteration loop
(train step, periodic validation, periodic checkpoint) and the final report. The parts come from the engine.
"""

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ...engine import distributed, reporting
from ...engine.checkpoint import BEST, LAST, check_resume, check_world_size, load_checkpoint, restore_rng, save_checkpoint
from ...engine.config import BOOKKEEPING_KEYS as COMMON_BOOKKEEPING_KEYS
from ...engine.config import Precision, scheduler_kwargs
from ...engine.optim import OptimizerStep, TrainingError, TrainingInterrupted
from ...engine.rundir import RunDirectory
from ...engine.schedulers import build_scheduler
from ...engine.training import evaluation_loader, make_deterministic, seed_everything, training_batches, wrap_distributed
from ...models.checkpoint import load_head_state_dict
from ...models.frozen import set_train_mode
from .config import SegmentationConfig
from .decoders import decoder, resolve_num_classes
from .eval import METRICS_FILENAME, RESULTS_FILENAME, evaluate_segmentation_model, write_results
from .setup import build_model, build_optimizer, build_train_dataset, build_val_dataset, inference_settings

logger = logging.getLogger("dinoseg")

CONFIG_FILENAME = "segmentation_config.yaml"
# What a training run writes besides its config, checkpoints and metrics.jsonl (`overwrite_output_dir` removes these).
RUN_FILES = (RESULTS_FILENAME, METRICS_FILENAME, "training_curves.png", "tensorboard", "predictions", "demo_inputs",
             "eval")
# Keys a resumed run may change (README, "Run directories and resuming"); any other difference is refused.
BOOKKEEPING_KEYS = COMMON_BOOKKEEPING_KEYS + ("eval.crop_batch_size", "eval.save_predictions")


def train_segmentation(cfg: DictConfig) -> dict:
    # 1. Processes, devices, the run directory and the checkpoint to resume from: all checked, nothing written.
    if cfg.train.deterministic:
        make_deterministic()
    device = distributed.setup(cfg.device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if cfg.train.batch_size % world:
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} does not split over {world} processes")
    with distributed.together():  # a failure on any process stops them all, before anything is written
        run = RunDirectory(cfg.output_dir, CONFIG_FILENAME, RUN_FILES)
        resume_from = run.check(resume=cfg.train.resume, overwrite=cfg.overwrite_output_dir, lock=rank == 0)
        ckpt = load_checkpoint(resume_from) if resume_from else None
        if ckpt is not None:
            changes = check_resume(ckpt, cfg, SegmentationConfig, BOOKKEEPING_KEYS, source=str(resume_from))
            check_world_size(ckpt)
        seed_everything(cfg.seed + rank)

        # 2. Data: an endless, resumable stream of augmented training batches; a sharded validation set.
        train_set = build_train_dataset(cfg)
        val_set = build_val_dataset(cfg)
        num_classes = resolve_num_classes(cfg.decoder_head, dataset=train_set)
        class_names = getattr(val_set, "class_names", None)

        # 3. Model, loss, optimiser over trainable parameters only, schedule, gradient scaler.
        head = decoder(cfg.decoder_head)
        model = build_model(cfg, num_classes).to(device)
        criterion = head.criterion(cfg.train, num_classes).to(device)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(cfg.scheduler.type, optimizer, cfg.optimizer.lr, cfg.scheduler.total_iter,
                                    scheduler_kwargs(cfg.scheduler))
        step = OptimizerStep(optimizer, scheduler, Precision(cfg.precision), cfg.optimizer.gradient_clip, device)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        start_iter, best = 0, {}
        if ckpt is not None:
            load_head_state_dict(model, ckpt["model"], source=str(resume_from))
            step.load_state_dict(ckpt)
            start_iter, best = int(ckpt["iteration"]), dict(ckpt["best"])

    # 4. The run starts: its directory is locked and the config it uses written (rank 0).
    out = run.path
    with distributed.together():
        if rank == 0:
            run.start(config_yaml, overwrite=cfg.overwrite_output_dir)
            logger.info("config:\n%s", config_yaml)
            if ckpt is not None:
                logger.info("resumed from %s at iteration %d%s", resume_from, start_iter,
                            "".join(f"\n  changed: {c}" for c in changes))
    log = reporting.MetricsLog(out, cfg.train.tensorboard, enabled=rank == 0)
    log.truncate_after(start_iter)

    batches = training_batches(train_set, cfg.train.batch_size, seed=cfg.seed, start_iteration=start_iter,
                               num_workers=cfg.train.num_workers)
    val_loader = evaluation_loader(val_set, num_workers=min(cfg.train.num_workers, 2), seed=cfg.seed,
                                   max_samples=cfg.eval.max_val_samples)
    settings = inference_settings(cfg)
    train_model = wrap_distributed(model, device)
    set_train_mode(train_model)
    if ckpt is not None:
        restore_rng(ckpt)  # last, so nothing above shifts the restored stream (dropout draws from it)
    total = cfg.scheduler.total_iter
    metric_name = cfg.eval.metric_to_save
    last_path = out / LAST
    saved = start_iter if ckpt is not None else None  # iteration of the last checkpoint on disk
    results = {}
    bar = reporting.progress(total, desc="train", initial=start_iter)
    t0 = time.perf_counter()
    window: list[float] = []  # losses since the last log line

    def checkpoint(path: Path, done: int) -> None:
        save_checkpoint(path, model=model, step=step, iteration=done, best=best, config_yaml=config_yaml)

    # 5. The loop.
    done = start_iter
    try:
        for iteration in range(start_iter, total):
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True).long()

            loss = head.loss(criterion, train_model(images), labels)
            loss_value = distributed.all_reduce_sum(loss.detach().float().clone()).item() / world
            if not math.isfinite(loss_value):
                kept = f"last checkpoint kept: {last_path}" if saved is not None else "no checkpoint written yet"
                raise TrainingError(f"loss is {loss_value} at iteration {iteration}; training stopped ({kept})")
            lr = step.step(loss)

            done = iteration + 1
            window.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if done % cfg.train.log_interval == 0 or done == total:
                # The mean over the logging window: single-batch losses are too noisy to read a curve from.
                log.write(done, loss=sum(window) / len(window), lr=lr, seconds=time.perf_counter() - t0)
                window.clear()

            if done % cfg.eval.eval_interval == 0 or done == total:
                results = evaluate_segmentation_model(model, val_loader, device, num_classes=num_classes, settings=settings,
                                                      class_names=class_names)
                set_train_mode(train_model)
                log.write(done, val={k: v for k, v in results.items() if isinstance(v, float)})
                if rank == 0:
                    logger.info("iteration %d: %s=%.4f", done, metric_name, results[metric_name])
                if results[metric_name] > best.get(metric_name, -math.inf):
                    best = {k: v for k, v in results.items() if isinstance(v, float)} | {"iteration": done}
                    checkpoint(out / BEST, done)
            if done % cfg.train.checkpoint_interval == 0 or done == total:
                checkpoint(last_path, done)
                saved = done
    except KeyboardInterrupt:
        kept = f"last checkpoint: {last_path} (iteration {saved})" if saved is not None else "no checkpoint written"
        raise TrainingInterrupted(f"interrupted at iteration {done} of {total}; {kept}; resume with the same "
                                  f"command and train.resume=true") from None
    finally:
        bar.close()

    # 6. Final report (rank 0).
    if rank == 0 and results:
        write_results(results, out)
    distributed.barrier()
    return results
