"""torch.hub entry points: `torch.hub.load(repo_dir, 'dinov3_vitl16', source='local', weights=path)`."""

dependencies = ["torch", "torchvision", "omegaconf", "numpy"]

from dinoseg.hub.backbones import (  # noqa: E402,F401
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
)
from dinoseg.hub.depthers import (  # noqa: E402,F401
    dinov3_vit7b16_dd,
    dinov3_vitl16_chmv2,
)
from dinoseg.hub.segmentors import (  # noqa: E402,F401
    dinov3_vit7b16_ade20k_linear,
    dinov3_vit7b16_ms,
    dinov3_vitb16_ade20k_linear,
    dinov3_vith16plus_ade20k_linear,
    dinov3_vitl16_ade20k_linear,
    dinov3_vitl16plus_ade20k_linear,
    dinov3_vits16_ade20k_linear,
    dinov3_vits16plus_ade20k_linear,
)
