"""Pieces of every training loop: processes and seeds, opening and starting the run (with what it resumes), the
resumable stream of training batches, the sharded evaluation loader, and DDP over the trainable part of a model."""

import logging
import os
import random

import numpy as np
import torch
from torch import nn

from ..data.loaders import InfiniteDataloader, make_data_loader, worker_init_fn
from ..models.frozen import frozen_names
from . import distributed
from .checkpoint import Resumed, check_resume, check_world_size, load_checkpoint
from .config import Resume
from .optim import TrainingError
from .reporting import MetricsLog
from .rundir import RunDirectory
from .sampling import EpochSeededDataset, InfiniteShardedSampler

logger = logging.getLogger("dinoseg")


def make_deterministic() -> None:
    """`train.deterministic`: the same run gives the same weights on CUDA too (kill and resume included), at some
    speed. Call before the first CUDA work: cuBLAS reads its workspace setting when it starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_processes(device: str | None, *, batch_size: int, deterministic: bool, seed: int) -> torch.device:
    """Deterministic mode (first: before any CUDA work), the process group under torchrun and this process's
    device, its RNGs seeded with `seed` + rank; the global `batch_size` must split evenly over the processes."""
    if deterministic:
        make_deterministic()
    device = distributed.setup(device)
    world = distributed.get_world_size()
    if batch_size % world:
        raise TrainingError(f"train.batch_size={batch_size} does not split over {world} processes")
    seed_everything(seed + distributed.get_rank())
    return device


def open_run(run: RunDirectory, *, resume: Resume, overwrite: bool, config, schema: type,
             allowed_changes: tuple[str, ...]) -> Resumed:
    """Check, writing nothing, that a training run may use `run`'s directory, and read the checkpoint it resumes from:
    written by as many processes, with a config that differs from `config` (of dataclass `schema`) in
    `allowed_changes` only (`check_resume`). Every process calls it; rank 0 first, as it locks the directory and
    finishes or undoes a start that a kill interrupted there (`RunDirectory.recover`) before the others look."""
    main = distributed.is_main_process()
    with distributed.together():
        path = run.check(resume=resume, overwrite=overwrite) if main else None
    if not main:
        path = run.check(resume=resume, overwrite=overwrite, lock=False)
    if path is None:
        return Resumed()
    checkpoint = load_checkpoint(path)
    changes = check_resume(checkpoint, config, schema, allowed_changes, source=str(path))
    check_world_size(checkpoint)
    return Resumed(checkpoint, path, changes)


def start_run(run: RunDirectory, config_yaml: str, resumed: Resumed, *, tensorboard: bool) -> MetricsLog:
    """The run starts (rank 0 writes): its directory created and locked, the files of a run it replaces moved aside
    until its first checkpoint (`RunDirectory.start`), the config written and logged with what was resumed. Returns
    the metrics log, cut back to the resumed iteration."""
    main = distributed.is_main_process()
    with distributed.together():
        if main:
            run.start(config_yaml, new_run=resumed.checkpoint is None)
            logger.info("config:\n%s", config_yaml)
            if resumed.checkpoint is not None:
                logger.info("resumed from %s at iteration %d%s", resumed.path, resumed.iteration,
                            "".join(f"\n  changed: {c}" for c in resumed.changes))
    log = MetricsLog(run.path, tensorboard, enabled=main)
    log.truncate_after(resumed.iteration)
    return log


def training_batches(dataset, batch_size: int, *, seed: int, start_iteration: int = 0, num_workers: int = 0,
                     collate_fn=None):
    """An endless iterator of this process's training batches (`batch_size` = the total over all processes),
    put together by `collate_fn` (default: stacked tensors; detection pads images of different sizes).

    Batch k is a function of (seed, k) alone (samples are keyed by epoch and index and augmented from a seed
    derived from them), so starting at `start_iteration` gives exactly the batches of an uninterrupted run.
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    per_process = batch_size // world
    sampler = InfiniteShardedSampler(len(dataset), seed=seed, rank=rank, world_size=world,
                                     start=start_iteration * per_process)
    return InfiniteDataloader(torch.utils.data.DataLoader(
        EpochSeededDataset(dataset, seed), batch_size=per_process, sampler=sampler, num_workers=num_workers,
        drop_last=True, persistent_workers=num_workers > 0, worker_init_fn=worker_init_fn if num_workers else None,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed + rank),  # keeps the global RNG untouched
    ))


def evaluation_loader(dataset, *, num_workers: int, seed: int, max_samples: int | None = None, collate_fn=None):
    """Batch size 1 (images keep their own sizes, targets their original resolution), sharded over processes
    without padding, so every sample is counted exactly once; `collate_fn` as for `training_batches`."""
    if max_samples is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(len(dataset), max_samples)))
    return make_data_loader(dataset, batch_size=1, num_workers=num_workers, shuffle=False, seed=seed, pad_shards=False,
                            rank=distributed.get_rank(), world_size=distributed.get_world_size(), collate_fn=collate_fn)


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable part only: the head and the adapted tensors of an adapted backbone; the frozen
    backbone weights are neither broadcast nor all-reduced."""
    if not distributed.is_enabled():
        return model
    model = distributed.convert_sync_batchnorm(model, device)
    frozen = frozen_names(model)
    ignored = [n for n, _ in model.named_parameters() if n in frozen]
    ignored += [n for n, _ in model.named_buffers() if n in frozen]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
