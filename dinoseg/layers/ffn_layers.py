import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, device=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward. The hidden size is 2/3 of the nominal one (same parameter budget as an MLP),
    rounded up to a multiple of `align_to` as the official checkpoints do."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, align_to: int = 8, device=None):
        super().__init__()
        d = int(hidden_features * 2 / 3)
        hidden = d + (-d % align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w3 = nn.Linear(hidden, in_features, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def make_ffn(name: str, in_features: int, hidden_features: int, bias: bool, device=None) -> nn.Module:
    """Official `ffn_layer` names: mlp, swiglu, swiglu32, swiglu64, swiglu128."""
    if name == "mlp":
        return Mlp(in_features, hidden_features, bias=bias, device=device)
    if name == "swiglu":
        return SwiGLUFFN(in_features, hidden_features, bias=bias, device=device)
    if name.startswith("swiglu") and name[len("swiglu"):].isdigit():
        align = int(name[len("swiglu"):])
        return SwiGLUFFN(in_features, hidden_features, bias=bias, align_to=align, device=device)
    raise ValueError(f"unknown ffn_layer {name!r}; expected one of mlp, swiglu, swiglu32, swiglu64, swiglu128")
