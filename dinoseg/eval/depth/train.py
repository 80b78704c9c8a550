"""Training loop for a depth head on a frozen (or adapted: `model.finetune`) DINOv3 backbone (one process or many
under torchrun): the official iteration recipe, built from the engine's parts.

Read it top to bottom: set-up, data, model, optimisation objects, optional resume, then the iteration loop (train
step, periodic validation without TTA, periodic checkpoint), the final evaluation of `datasets.test` with the
configured TTA (`results-depth.csv`), and `model_final.pth`, the head in the official trainer's layout.
"""

import logging

import torch
from omegaconf import DictConfig, OmegaConf

from ...data.adapters import DatasetWithEnumeratedTargets
from ...engine import distributed, reporting
from ...engine.checkpoint import Checkpoints
from ...engine.config import BOOKKEEPING_KEYS as COMMON_BOOKKEEPING_KEYS
from ...engine.config import Precision, scheduler_kwargs
from ...engine.files import write_atomically
from ...engine.optim import OptimizerStep, TrainingError
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
from ...layers.deterministic import resize_bilinear
from ...models.finetune import RECORD, adaptation_record
from ...models.frozen import head_state_dict, set_train_mode
from .config import DepthConfig
from .datasets.datasets_utils import make_valid_mask
from .eval import METRICS_FILENAME, RESULTS_FILENAME, evaluate_depth_model, write_results
from .loss import SigLoss
from .metrics import metrics_from_names
from .setup import (
    build_criterion,
    build_model,
    build_optimizer,
    build_test_dataset,
    build_train_dataset,
    build_val_dataset,
    evaluation_settings,
    result_config,
)

logger = logging.getLogger("dinoseg")

CONFIG_FILENAME = "depth_config.yaml"  # the official name of the saved config
FINAL_FILENAME = "model_final.pth"  # the head as the official trainer promises it: {"model": decoder state dict}
# What a training run writes besides its config, checkpoints and metrics.jsonl (`overwrite_output_dir` removes these).
RUN_FILES = (RESULTS_FILENAME, METRICS_FILENAME, FINAL_FILENAME, "training_curves.png", "tensorboard", "visualizations",
             "predictions", "demo_inputs", "eval")
# Keys a resumed run may change (README, "Run directories and resuming"); any other difference is refused.
BOOKKEEPING_KEYS = COMMON_BOOKKEEPING_KEYS + ("result_config.",)


def dataset_name(descriptor: str) -> str:
    """The dataset type of a descriptor ("NYU:split=VAL" -> "NYU"), as the official results name their columns."""
    return str(descriptor).split(":", 1)[0]


def evaluation_loader_of(dataset, cfg: DictConfig, max_samples: int | None = None):
    return evaluation_loader(DatasetWithEnumeratedTargets(dataset), num_workers=min(cfg.train.num_workers, 2),
                             seed=cfg.seed, max_samples=max_samples)


def skip_loss_warm_up(criterion: torch.nn.Module, iterations: int) -> None:
    """SigLoss counts its warm-up calls; a run resumed at `iterations` has made that many (one per iteration)."""
    for module in criterion.modules():
        if isinstance(module, SigLoss):
            module.warm_up_counter = min(iterations, module.warm_iter)


def depth_loss(criterion, pred: torch.Tensor, depth: torch.Tensor, eval_mask: str, ignored_value: float) -> torch.Tensor:
    """The official training loss: ground truth outside the `eval_mask` crop becomes `ignored_value`, the prediction
    is resized (bilinear) to the ground truth, and the losses see the valid pixels only."""
    valid = make_valid_mask(depth, eval_crop=eval_mask, ignored_value=ignored_value)
    depth = depth.masked_fill(~valid, ignored_value)
    if pred.shape[-2:] != depth.shape[-2:]:
        pred = resize_bilinear(pred, depth.shape[-2:])
    return criterion(pred, depth, valid)


def next_batch(batches) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return next(batches)
    except RuntimeError as e:  # raised by the collation, in this process or a loader worker
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        raise TrainingError("training samples of different sizes cannot form a batch: set transforms.train.random_crop="
                            "[H, W] (or transforms.train.img_size=[H, W])") from None


def train_depth(cfg: DictConfig) -> dict:
    # 1. Processes, devices and seeds, the run directory and the checkpoint to resume from: all checked, nothing written.
    device = start_processes(cfg.device, batch_size=cfg.train.batch_size, deterministic=cfg.train.deterministic,
                             seed=cfg.seed)
    rank = distributed.get_rank()
    with distributed.together():  # a failure on any process stops them all, before anything is written
        run = RunDirectory(cfg.output_dir, CONFIG_FILENAME, RUN_FILES)
        resumed = open_run(run, resume=cfg.train.resume, overwrite=cfg.overwrite_output_dir, config=cfg,
                           schema=DepthConfig, allowed_changes=BOOKKEEPING_KEYS)

        # 2. Data: an endless, resumable stream of augmented training batches; sharded validation and test sets.
        train_set = build_train_dataset(cfg)
        val_set = build_val_dataset(cfg)
        test_set = build_test_dataset(cfg)

        # 3. Model, loss, optimiser over the head only, schedule (with the official beta1 cycle), gradient scaler;
        # their resumed states.
        model = build_model(cfg).to(device)
        criterion = build_criterion(cfg).to(device)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(cfg.scheduler.type, optimizer, cfg.optimizer.lr, cfg.scheduler.total_iter,
                                    scheduler_kwargs(cfg.scheduler))
        step = OptimizerStep(optimizer, scheduler, Precision(cfg.precision), cfg.optimizer.gradient_clip, device)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        start_iter = resumed.restore(model, step)
        skip_loss_warm_up(criterion, start_iter)

    # 4. Training batches from the resumed iteration, the validation loader, DDP over the head.
    batches = training_batches(train_set, cfg.train.batch_size, seed=cfg.seed, start_iteration=start_iter,
                               num_workers=cfg.train.num_workers)
    val_loader = evaluation_loader_of(val_set, cfg, cfg.eval.max_val_samples)
    validation = evaluation_settings(cfg, use_tta=False)  # the official validation runs without TTA
    train_model = wrap_distributed(model, device)
    set_train_mode(train_model)

    # 5. The run starts (rank 0 writes): the directory locked, the config it uses written; a run it replaces is moved
    # aside until its first checkpoint, and comes back if it stops before (`checkpoints.close`).
    log = start_run(run, config_yaml, resumed, tensorboard=cfg.train.tensorboard)
    total = cfg.scheduler.total_iter
    metric = metrics_from_names([cfg.eval.metric_to_save])[0]
    loss_mask, ignored = cfg.transforms.train.eval_mask, cfg.eval.ignored_value
    checkpoints = Checkpoints(run, model=model, step=step, config_yaml=config_yaml, resumed=resumed)
    losses = reporting.LossLog(log, checkpoints, total=total, start=start_iter, interval=cfg.train.log_interval)
    resumed.restore_rng()  # last, so nothing above shifts the restored stream

    # 6. The loop. SIGTERM on any process (a preemption) stops all of them at the end of a step, with a checkpoint there.
    done = start_iter
    try:
        for iteration in range(start_iter, total):
            images, depths = next_batch(batches)
            images = images.to(device, non_blocking=True)
            depths = depths.to(device, non_blocking=True).float()

            loss = depth_loss(criterion, train_model(images), depths, loss_mask, ignored)
            loss_value = losses.reduce(loss, iteration)  # the mean over processes; a non-finite one stops the run
            lr = step.step(loss)
            done = iteration + 1
            losses.update(done, loss_value, lr)

            if done % cfg.eval.eval_interval == 0 or done == total:
                results = evaluate_depth_model(model, val_loader, validation, device)
                set_train_mode(train_model)
                scores = {name: results[name] for name in cfg.metrics}
                log.write(done, val=scores)
                if rank == 0:
                    logger.info("iteration %d: %s", done, "  ".join(f"{k}={v:.4f}" for k, v in scores.items()))
                if metric.is_better(scores[metric.name], checkpoints.best.get(metric.name, metric.worst_value)):
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

    # 7. The final evaluation (the official one: the test set, with TTA as configured), then model_final.pth.
    out, test = run.path, cfg.datasets.test or cfg.datasets.val
    saving = result_config(cfg)
    if rank == 0 and saving.save_results:
        (out / "visualizations").mkdir(exist_ok=True)
    distributed.barrier()
    final = evaluation_settings(cfg, use_tta=cfg.eval.use_tta)
    results = evaluate_depth_model(model, evaluation_loader_of(test_set, cfg), final, device,
                                   sample_name=test_set.sample_name, result_config=saving, save_dir=out)
    if rank == 0:
        write_results(results, out, dataset_name(test), cfg.metrics)
        record = adaptation_record(model)
        if record is None:  # the official layout: the decoder's keys
            final = {"model": {k.removeprefix("decoder."): v for k, v in head_state_dict(model).items()}}
        else:  # with the adapted tensors under their full names, and the backbone they apply to
            final = {"model": head_state_dict(model), RECORD: record}
        write_atomically(out / FINAL_FILENAME, lambda f: torch.save({**final, "iteration": total}, f))
    distributed.barrier()
    return results
