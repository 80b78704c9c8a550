from .attention import LinearKMaskedBias, SelfAttention
from .block import SelfAttentionBlock
from .ffn_layers import Mlp, SwiGLUFFN
from .layer_scale import LayerScale
from .patch_embed import PatchEmbed
from .rope_position_encoding import RopePositionEmbedding

__all__ = [
    "LayerScale",
    "LinearKMaskedBias",
    "Mlp",
    "PatchEmbed",
    "RopePositionEmbedding",
    "SelfAttention",
    "SelfAttentionBlock",
    "SwiGLUFFN",
]
