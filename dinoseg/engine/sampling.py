"""Deterministic, resumable training data: samples are keyed by (epoch, index) and augmented from a seed
derived from (seed, epoch, index), so a run resumed at any iteration sees exactly the batches and
augmentations of an uninterrupted one, whatever the number of loader workers."""

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EpochSeededDataset(Dataset):
    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        # Fork the global RNGs so loading in the main process (num_workers=0) does not disturb the training RNG.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class InfiniteShardedSampler(Sampler):
    """Endless (epoch, index) keys for one rank: a fresh permutation per epoch (seeded), split evenly across ranks
    (the tail that does not divide is dropped, so every rank takes the same number of steps), starting after the
    first `start` keys of this rank without loading them."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0, shuffle: bool = True):
        if n < world_size:
            raise ValueError(f"training set has {n} samples, fewer than the {world_size} processes")
        self.n, self.seed, self.rank, self.world, self.start, self.shuffle = n, seed, rank, world_size, start, shuffle
        self.per_rank = n // world_size

    def _epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[self.rank : self.per_rank * self.world : self.world]

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            for index in self._epoch_indices(epoch)[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0
