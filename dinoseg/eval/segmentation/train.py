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
from ...engine.checkpoint import BEST, LAST, load_checkpoint, restore_rng, save_checkpoint
from ...engine.config import Precision, save_config, scheduler_kwargs
from ...engine.optim import OptimizerStep, TrainingError
from ...engine.rundir import prepare_output_dir
from ...engine.schedulers import build_scheduler
from ...engine.training import evaluation_loader, seed_everything, training_batches, wrap_distributed
from ...models.checkpoint import load_head_state_dict
from ...models.frozen import set_train_mode
from .decoders import decoder, resolve_num_classes
from .eval import evaluate_segmentation_model, write_results
from .setup import build_model, build_optimizer, build_train_dataset, build_val_dataset, inference_settings

logger = logging.getLogger("dinoseg")

CONFIG_FILENAME = "segmentation_config.yaml"


def train_segmentation(cfg: DictConfig) -> dict:
    # 1. Processes, devices, output directory, seeds.
    device = distributed.setup(cfg.device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if cfg.train.batch_size % world:
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} does not split over {world} processes")
    out = prepare_output_dir(cfg.output_dir) if rank == 0 else Path(cfg.output_dir)
    distributed.barrier()
    if rank == 0:
        save_config(cfg, out / CONFIG_FILENAME)
        logger.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
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

    # 4. Resume from the last checkpoint if asked (and present).
    start_iter, best = 0, {}
    last_path = out / LAST
    if cfg.train.resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        load_head_state_dict(model, ckpt["model"], source=str(last_path))
        step.load_state_dict(ckpt)
        start_iter, best = int(ckpt["iteration"]), dict(ckpt["best"])
        logger.info("resumed from %s at iteration %d", last_path, start_iter)
    log = reporting.MetricsLog(out, cfg.train.tensorboard, enabled=rank == 0)
    log.truncate_after(start_iter)

    batches = training_batches(train_set, cfg.train.batch_size, seed=cfg.seed, start_iteration=start_iter,
                               num_workers=cfg.train.num_workers)
    val_loader = evaluation_loader(val_set, num_workers=min(cfg.train.num_workers, 2), seed=cfg.seed,
                                   max_samples=cfg.eval.max_val_samples)
    settings = inference_settings(cfg)
    train_model = wrap_distributed(model, device)
    set_train_mode(train_model)
    if start_iter:
        restore_rng(ckpt)  # last, so nothing above shifts the restored stream (dropout draws from it)
    total = cfg.scheduler.total_iter
    metric_name = cfg.eval.metric_to_save
    results = {}
    bar = reporting.progress(total, desc="train", initial=start_iter)
    t0 = time.perf_counter()
    window: list[float] = []  # losses since the last log line

    def checkpoint(path: Path, done: int) -> None:
        save_checkpoint(path, model=model, step=step, iteration=done, best=best, config_yaml=config_yaml)

    # 5. The loop.
    for iteration in range(start_iter, total):
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).long()

        loss = head.loss(criterion, train_model(images), labels)
        loss_value = distributed.all_reduce_sum(loss.detach().float().clone()).item() / world
        if not math.isfinite(loss_value):
            kept = f"last checkpoint kept: {last_path}" if last_path.exists() else "no checkpoint written yet"
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
    bar.close()

    # 6. Final report (rank 0).
    if rank == 0 and results:
        write_results(results, out)
    distributed.barrier()
    return results
