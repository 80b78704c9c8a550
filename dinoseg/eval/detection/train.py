"""Training loop for a Plain-DETR detection head on a frozen (or adapted: `model.finetune`) DINOv3 backbone (one
process or many under torchrun), built from the engine's parts.

Read it top to bottom: set-up, data, model, loss, optimisation objects, optional resume, then the iteration loop
(train step with Plain-DETR's hybrid matching loss, periodic COCO validation choosing `checkpoint_best.pth`,
periodic checkpoint) and the final report (`results-detection.csv` / `.json`, `detections.json`).
"""

import logging
import math

import torch
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
from ...models.precision import weights_autocast
from .config import DetectionConfig
from .eval import DETECTIONS_FILENAME, METRICS_FILENAME, RESULTS_FILENAME, evaluate_detector, scores_of, write_results
from .loss import train_hybrid
from .metrics import CocoEvaluator
from .setup import (
    build_criterion,
    build_detector,
    build_optimizer,
    build_postprocess,
    build_train_dataset,
    build_val_dataset,
    check_classes,
    check_image_sizes,
)
from .util.misc import collate_fn

logger = logging.getLogger("dinoseg")

CONFIG_FILENAME = "detection_config.yaml"
# What a training run writes besides its config, checkpoints and metrics.jsonl (`overwrite_output_dir` removes these).
RUN_FILES = (RESULTS_FILENAME, METRICS_FILENAME, DETECTIONS_FILENAME, "training_curves.png", "tensorboard",
             "predictions", "demo_inputs", "eval")
# Keys a resumed run may change (README, "Run directories and resuming"); any other difference is refused.
BOOKKEEPING_KEYS = COMMON_BOOKKEEPING_KEYS + ("eval.score_threshold",)


def to_device(targets, device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def detection_loss(outputs: dict, targets: list[dict], criterion, k_one2many: int, lambda_one2many: float,
                   one2many: bool) -> tuple[torch.Tensor, dict]:
    """Plain-DETR's training loss: the criterion on the one-to-one queries plus, with one-to-many queries, the hybrid
    matching term (`train_hybrid`); the weighted sum of the loss dict, and the dict."""
    if one2many:
        loss_dict = train_hybrid(outputs, targets, k_one2many, criterion, lambda_one2many)
    else:
        loss_dict = criterion(outputs, targets)
    weights = criterion.weight_dict
    return sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights), loss_dict


def train_detection(cfg: DictConfig) -> dict:
    # 1. Processes, devices and seeds, the run directory and the checkpoint to resume from: all checked, nothing written.
    device = start_processes(cfg.device, batch_size=cfg.train.batch_size, deterministic=cfg.train.deterministic,
                             seed=cfg.seed)
    rank = distributed.get_rank()
    with distributed.together():  # a failure on any process stops them all, before anything is written
        run = RunDirectory(cfg.output_dir, CONFIG_FILENAME, RUN_FILES)
        resumed = open_run(run, resume=cfg.train.resume, overwrite=cfg.overwrite_output_dir, config=cfg,
                           schema=DetectionConfig, allowed_changes=BOOKKEEPING_KEYS)

        # 2. Data: an endless, resumable stream of augmented, padded training batches; a sharded validation set and
        # its ground truth for pycocotools (rank 0 scores).
        train_set = build_train_dataset(cfg)
        val_set = build_val_dataset(cfg)
        num_classes = cfg.decoder_head.num_classes or train_set.num_classes
        check_classes(train_set, num_classes, "train", f"decoder_head.num_classes={num_classes}")
        check_classes(val_set, num_classes, "val", f"decoder_head.num_classes={num_classes}")
        evaluator = CocoEvaluator(val_set) if rank == 0 else None

        # 3. Model, loss, optimiser over the head only (Plain-DETR's groups), schedule, gradient scaler; resumed states.
        model = build_detector(cfg, num_classes).to(device)
        queries = cfg.decoder_head.num_queries_one2one
        check_image_sizes(model, {"transforms.train.scales": (min(cfg.transforms.train.scales),
                                                              queries + cfg.decoder_head.num_queries_one2many),
                                  "transforms.eval.size": (cfg.transforms.eval.size, queries)})
        criterion = build_criterion(cfg, num_classes).to(device)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(cfg.scheduler.type, optimizer, cfg.optimizer.lr, cfg.scheduler.total_iter,
                                    scheduler_kwargs(cfg.scheduler))
        precision = Precision(cfg.precision)
        step = OptimizerStep(optimizer, scheduler, precision, cfg.optimizer.gradient_clip, device)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        start_iter = resumed.restore(model, step)

    # 4. Training batches from the resumed iteration, the validation loader, DDP over the head.
    batches = training_batches(train_set, cfg.train.batch_size, seed=cfg.seed, start_iteration=start_iter,
                               num_workers=cfg.train.num_workers, collate_fn=collate_fn)
    val_loader = evaluation_loader(val_set, num_workers=min(cfg.train.num_workers, 2), seed=cfg.seed,
                                   max_samples=cfg.eval.max_val_samples, collate_fn=collate_fn)
    postprocess = build_postprocess(cfg)
    head = cfg.decoder_head
    one2many = head.num_queries_one2many > 0
    train_model = wrap_distributed(model, device)
    set_train_mode(train_model)

    # 5. The run starts (rank 0 writes): the directory locked, the config it uses written; a run it replaces is moved
    # aside until its first checkpoint, and comes back if it stops before (`checkpoints.close`).
    log = start_run(run, config_yaml, resumed, tensorboard=cfg.train.tensorboard)
    total = cfg.scheduler.total_iter
    metric_name = cfg.eval.metric_to_save
    checkpoints = Checkpoints(run, model=model, step=step, config_yaml=config_yaml, resumed=resumed)
    losses = reporting.LossLog(log, checkpoints, total=total, start=start_iter, interval=cfg.train.log_interval)
    resumed.restore_rng()  # last, so nothing above shifts the restored stream
    metrics = detections = None

    # 6. The loop. SIGTERM on any process (a preemption) stops all of them at the end of a step, with a checkpoint there.
    done = start_iter
    try:
        for iteration in range(start_iter, total):
            samples, targets = next(batches)
            samples = samples.to(device, non_blocking=True)
            targets = to_device(targets, device)

            with weights_autocast(model, device.type, precision.dtype):
                outputs = train_model(samples)
            loss, _ = detection_loss(outputs, targets, criterion, head.k_one2many, head.lambda_one2many, one2many)
            loss_value = losses.reduce(loss, iteration)  # the mean over processes; a non-finite one stops the run
            lr = step.step(loss)
            done = iteration + 1
            losses.update(done, loss_value, lr)

            if done % cfg.eval.eval_interval == 0 or done == total:
                metrics, detections = evaluate_detector(model, val_loader, postprocess, evaluator, device,
                                                        label_to_category_id=val_set.label_to_category_id,
                                                        autocast_dtype=precision.dtype)
                set_train_mode(train_model)
                # Rank 0 scored the detections; every rank takes the same decision about checkpoint_best.pth.
                scores = distributed.all_gather_object(scores_of(metrics) if rank == 0 else None)[0]
                log.write(done, val=scores)
                value = scores[metric_name]
                if rank == 0:
                    logger.info("iteration %d: %s", done, "  ".join(f"{k}={v:.4f}" for k, v in scores.items()
                                                                    if v is not None and k in ("AP", "AP50", "AP75")))
                if value is not None and value > checkpoints.best.get(metric_name, -math.inf):
                    checkpoints.save_best(done, {k: v for k, v in scores.items() if v is not None})
            if done % cfg.train.checkpoint_interval == 0 or done == total or losses.preempted:
                checkpoints.save_last(done)
            if losses.preempted and done < total:
                raise checkpoints.preempted(done, total)
    except KeyboardInterrupt:
        raise checkpoints.interrupted(done, total) from None
    finally:
        losses.close()
        checkpoints.close()

    # 7. Final report (rank 0): the last validation's numbers and detections.
    if rank == 0 and metrics is not None:
        write_results(metrics, detections, run.path)
    distributed.barrier()
    return {"metrics": metrics, "detections": detections, "num_classes": num_classes}
