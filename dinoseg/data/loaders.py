"""Data loaders: distributed sharding, per-rank / per-worker / per-epoch seeding, an endless loader.

Randomness has two sources and both change with the epoch:
* the sample ORDER comes from the sampler (``DistributedSampler`` seeded with ``seed``, reshuffled by
  ``set_epoch``);
* the AUGMENTATIONS come from each worker's torch RNG. The loader's generator is seeded with
  ``seed + rank``; every time an epoch starts, PyTorch draws a fresh base seed from it and gives worker ``w``
  the torch seed ``base + w``. ``worker_init_fn`` seeds ``random`` and ``numpy`` from that seed too, so
  augmentations differ across ranks, workers and epochs and are reproducible for a given ``seed``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


def worker_init_fn(worker_id: int) -> None:
    """Seed ``random`` and ``numpy`` from the worker's torch seed (already distinct per rank, worker, epoch); leave
    SIGTERM to the parent (`end_on_sigterm_from_parent_only`)."""
    end_on_sigterm_from_parent_only()
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def end_on_sigterm_from_parent_only() -> None:
    """In a loader worker: end on a SIGTERM from the parent process (how PyTorch ends a worker that does not stop),
    ignore anyone else's. SLURM signals every process of a job, workers included; a worker that died of it would fail
    the training process, which stops cleanly on SIGTERM (a checkpoint at the end of its step) and ends its workers
    itself. A worker whose parent dies ends anyway (PyTorch's watchdog)."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def wait_for_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait_for_sigterm, daemon=True, name="sigterm").start()


class UnpaddedDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` that never repeats samples: rank ``r`` gets indices ``r, r + world, ...`` (ranks
    may get one sample less than others). For evaluation, where the stock sampler's padding would count some
    images twice in the metrics."""

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None, shuffle: bool = False, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.num_samples = len(range(self.rank, len(self.dataset), self.num_replicas))
        self.total_size = len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            indices = list(range(len(self.dataset)))
        return iter(indices[self.rank : self.total_size : self.num_replicas])


def make_data_loader(
    dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    *,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    pad_shards: bool | None = None,
) -> DataLoader:
    """A ``DataLoader`` whose sampler has ``set_epoch`` (reshuffles each epoch) and whose workers are seeded
    per rank, worker and epoch.

    The loader serves shard ``rank`` of ``world_size`` (the engine passes the process's own). ``pad_shards`` (default:
    ``shuffle``) chooses the stock ``DistributedSampler``, which pads every shard to equal length by repeating
    samples (right for training, where ranks must step together), or ``UnpaddedDistributedSampler`` (right for
    evaluation: every sample is seen exactly once).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError(f"cannot build a data loader on an empty dataset: {dataset!r}")
    if pad_shards is None:
        pad_shards = shuffle
    # Even without distribution, a DistributedSampler over one replica gives a seeded, set_epoch-able shuffle.
    sampler_cls = DistributedSampler if pad_shards else UnpaddedDistributedSampler
    kwargs = {"drop_last": drop_last} if sampler_cls is DistributedSampler else {}
    sampler = sampler_cls(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, **kwargs)
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        generator=generator,
    )


class InfiniteDataloader:
    """Iterate a ``DataLoader`` forever, calling ``sampler.set_epoch(epoch)`` before every pass so that each
    pass has a new order (and, through the loader's generator, new worker seeds). ``start_epoch`` resumes."""

    def __init__(self, dataloader: DataLoader, start_epoch: int = 0):
        # An endless sampler (the training engine's resumable one) has no length: one pass never ends.
        if hasattr(dataloader.sampler, "__len__") and len(dataloader) == 0:
            raise ValueError("InfiniteDataloader: the data loader yields no batch (dataset smaller than a batch "
                             "with drop_last=True?)")
        self.dataloader = dataloader
        self.sampler = dataloader.sampler
        self.epoch = start_epoch
        self._iterator = None

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self):
        return self

    def _start_epoch(self) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        self._iterator = iter(self.dataloader)

    def __next__(self):
        if self._iterator is None:
            self._start_epoch()
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            return next(self._iterator)

