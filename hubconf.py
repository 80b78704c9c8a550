"""torch.hub entry points: `torch.hub.load(repo_dir, 'dinov3_vitl16', source='local', weights=path)`."""

dependencies = ["torch", "torchvision", "omegaconf", "numpy"]

from dinoseg.hub import *  # noqa: E402,F403
