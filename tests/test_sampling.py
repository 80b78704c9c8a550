import itertools

import torch

from dinoseg.engine.sampling import EpochSeededDataset, InfiniteShardedSampler


class _RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return index, torch.rand(1).item()  # stands in for a random augmentation


def test_resumed_sampler_continues_the_same_stream():
    full = list(itertools.islice(iter(InfiniteShardedSampler(10, seed=3)), 35))
    resumed = list(itertools.islice(iter(InfiniteShardedSampler(10, seed=3, start=17)), 18))
    assert resumed == full[17:]
    epochs = [e for e, _ in full]
    assert epochs[:10] == [0] * 10 and epochs[10:20] == [1] * 10
    assert sorted(i for _, i in full[:10]) == list(range(10))
    assert [i for _, i in full[:10]] != [i for _, i in full[10:20]]  # reshuffled each epoch


def test_ranks_split_each_epoch_without_overlap():
    a = list(itertools.islice(iter(InfiniteShardedSampler(11, seed=0, rank=0, world_size=2)), 5))
    b = list(itertools.islice(iter(InfiniteShardedSampler(11, seed=0, rank=1, world_size=2)), 5))
    assert not {i for _, i in a} & {i for _, i in b}
    assert len({i for _, i in a} | {i for _, i in b}) == 10  # the odd sample out is dropped this epoch


def test_augmentation_is_a_function_of_seed_epoch_index_and_leaves_global_rng_alone():
    ds = EpochSeededDataset(_RandomDataset(), seed=5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    x = ds[(0, 3)]
    assert torch.equal(torch.get_rng_state(), before)
    assert ds[(0, 3)] == x
    assert ds[(1, 3)] != x  # a new epoch draws new augmentations
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=InfiniteShardedSampler(10, seed=5), num_workers=2)
    with_workers = [b for b, _ in zip(loader, range(3))]
    loader0 = torch.utils.data.DataLoader(ds, batch_size=2, sampler=InfiniteShardedSampler(10, seed=5), num_workers=0)
    without = [b for b, _ in zip(loader0, range(3))]
    for a, b in zip(with_workers, without):
        torch.testing.assert_close(a[1], b[1])
