"""Training loop for a segmentation head on a frozen (or adapted: `model.finetune`) DINOv3 backbone (one process or
many under torchrun).

Read it top to bottom: set-up, data, model, optimisation objects, optional resume, then the iteration loop
(train step, periodic validation, periodic checkpoint) and the final report. The parts come from the engine.
"""

import logging
import math

from omegaconf import DictConfig, OmegaConf

from ...engine import distributed, reporting
from ...engine.checkpoint import Checkpoints
from ...engine.config import BOOKKEEPING_KEYS as COMMON_BOOKKEEPING_KEYS
from ...engine.config import Precision, scheduler_kwargs
from ...engine.optim import OptimizerStep
from ...engine.rundir import RunDirectory
from ...engine.schedulers import build_scheduler
from ...engine.training import (
    evaluation_loader,
    open_run,
    start_processes,
    start_run,
    training_batches,
    wrap_distributed,
)
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
    # 1. Processes, devices and seeds, the run directory and the checkpoint to resume from: all checked, nothing written.
    device = start_processes(cfg.device, batch_size=cfg.train.batch_size, deterministic=cfg.train.deterministic,
                             seed=cfg.seed)
    rank = distributed.get_rank()
    with distributed.together():  # a failure on any process stops them all, before anything is written
        run = RunDirectory(cfg.output_dir, CONFIG_FILENAME, RUN_FILES)
        resumed = open_run(run, resume=cfg.train.resume, overwrite=cfg.overwrite_output_dir, config=cfg,
                           schema=SegmentationConfig, allowed_changes=BOOKKEEPING_KEYS)

        # 2. Data: an endless, resumable stream of augmented training batches; a sharded validation set.
        train_set = build_train_dataset(cfg)
        val_set = build_val_dataset(cfg)
        num_classes = resolve_num_classes(cfg.decoder_head, dataset=train_set)
        class_names = getattr(val_set, "class_names", None)

        # 3. Model, loss, optimiser over trainable parameters only, schedule, gradient scaler; their resumed states.
        head = decoder(cfg.decoder_head)
        model = build_model(cfg, num_classes).to(device)
        criterion = head.criterion(cfg.train, num_classes).to(device)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(cfg.scheduler.type, optimizer, cfg.optimizer.lr, cfg.scheduler.total_iter,
                                    scheduler_kwargs(cfg.scheduler))
        step = OptimizerStep(optimizer, scheduler, Precision(cfg.precision), cfg.optimizer.gradient_clip, device)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        start_iter = resumed.restore(model, step)

    # 4. Training batches from the resumed iteration, the validation loader, DDP over the head.
    batches = training_batches(train_set, cfg.train.batch_size, seed=cfg.seed, start_iteration=start_iter,
                               num_workers=cfg.train.num_workers)
    val_loader = evaluation_loader(val_set, num_workers=min(cfg.train.num_workers, 2), seed=cfg.seed,
                                   max_samples=cfg.eval.max_val_samples)
    settings = inference_settings(cfg)
    train_model = wrap_distributed(model, device)
    set_train_mode(train_model)

    # 5. The run starts (rank 0 writes): the directory locked, the config it uses written; a run it replaces is moved
    # aside until its first checkpoint, and comes back if it stops before (`checkpoints.close`).
    log = start_run(run, config_yaml, resumed, tensorboard=cfg.train.tensorboard)
    total = cfg.scheduler.total_iter
    metric_name = cfg.eval.metric_to_save
    checkpoints = Checkpoints(run, model=model, step=step, config_yaml=config_yaml, resumed=resumed)
    losses = reporting.LossLog(log, checkpoints, total=total, start=start_iter, interval=cfg.train.log_interval)
    resumed.restore_rng()  # last, so nothing above shifts the restored stream (dropout draws from it)
    results = {}

    # 6. The loop. SIGTERM on any process (a preemption) stops all of them at the end of a step, with a checkpoint there.
    done = start_iter
    try:
        for iteration in range(start_iter, total):
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True).long()

            loss = head.loss(criterion, train_model(images), labels)
            loss_value = losses.reduce(loss, iteration)  # the mean over processes; a non-finite one stops the run
            lr = step.step(loss)
            done = iteration + 1
            losses.update(done, loss_value, lr)

            if done % cfg.eval.eval_interval == 0 or done == total:
                results = evaluate_segmentation_model(model, val_loader, device, num_classes=num_classes, settings=settings,
                                                      class_names=class_names)
                set_train_mode(train_model)
                scores = {k: v for k, v in results.items() if isinstance(v, float)}
                log.write(done, val=scores)
                if rank == 0:
                    logger.info("iteration %d: %s=%.4f", done, metric_name, results[metric_name])
                if results[metric_name] > checkpoints.best.get(metric_name, -math.inf):
                    checkpoints.save_best(done, scores)
            if done % cfg.train.checkpoint_interval == 0 or done == total or losses.preempted:
                checkpoints.save_last(done)
            if losses.preempted and done < total:
                raise checkpoints.preempted(done, total)
    except KeyboardInterrupt:
        raise checkpoints.interrupted(done, total) from None
    finally:
        losses.close()
        checkpoints.close()

    # 7. Final report (rank 0).
    if rank == 0 and results:
        write_results(results, run.path)
    distributed.barrier()
    return results
