"""Constants and helpers shared by every task's transforms."""

import torch

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def to_pair(value, name: str) -> tuple[int, int]:
    """An int or an (height, width) pair of positive ints -> (height, width); the error names `name`."""
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair


def rand_uniform(low: float, high: float) -> float:
    # torch's RNG, so that DataLoader workers (seeded per worker and epoch) draw different augmentations.
    return low + (high - low) * torch.rand(()).item()


def rand_bool(p: float) -> bool:
    return p > 0 and torch.rand(()).item() < p


class PairTransforms:
    """`transform` on the image and `target_transform` on the target of an (image, target) pair, either None to
    leave it as it is: the official datasets' separate transforms (torchvision's ``StandardTransform``) as one
    transform of the pair."""

    def __init__(self, transform=None, target_transform=None):
        self.transform, self.target_transform = transform, target_transform

    def __call__(self, image, target):
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(transform={self.transform!r}, target_transform={self.target_transform!r})"
