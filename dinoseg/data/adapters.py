"""Dataset wrappers (official `dinov3.data.adapters`)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class DatasetWithEnumeratedTargets(Dataset):
    """Yields ``(image, (index, target))``: evaluation loops learn which sample each prediction belongs to.

    With `pad_dataset`, the length is rounded up to a multiple of `num_replicas` (as a `DistributedSampler`
    without drop_last pads): the padding entries repeat samples from the start with index -1, so that every
    rank runs the same number of forward passes and the loops can skip them.
    """

    def __init__(self, dataset: Dataset, pad_dataset: bool = False, num_replicas: int | None = None):
        if pad_dataset and (num_replicas is None or num_replicas < 1):
            raise ValueError("DatasetWithEnumeratedTargets: pad_dataset=True needs num_replicas >= 1")
        self._dataset = dataset
        self._size = len(dataset)
        self._pad_dataset = pad_dataset
        self._padded_size = -(-self._size // num_replicas) * num_replicas if pad_dataset else self._size

    def __len__(self) -> int:
        return self._padded_size

    def __getitem__(self, index: int) -> tuple[Any, tuple[int, Any]]:
        if not 0 <= index < self._padded_size:
            raise IndexError(f"index {index} out of range for {self._padded_size} samples")
        image, target = self._dataset[index % self._size]
        if index >= self._size:
            return image, (-1, target)
        return image, (index, index if target is None else target)
