"""The CHMv2 mixed-log depth bins and their normalisation (official names)."""


import torch

# The CHMv2 head predicts depth divided by this factor: its bins stop at max_depth / 8 and its output is
# multiplied back by 8.
CHMV2_DEPTH_SCALE = 8.0


def create_chmv2_mixlog_bins(min_depth: float, max_depth: float, n_bins: int, device=None) -> torch.Tensor:
    """Bin centres that move from log spacing (first bin) to linear spacing (last bin) on
    [min_depth, max_depth / 8]."""
    top = max_depth / CHMV2_DEPTH_SCALE
    linear = torch.linspace(min_depth, top, n_bins, device=device)
    log = torch.exp(torch.linspace(torch.log(torch.tensor(min_depth)), torch.log(torch.tensor(top)), n_bins, device=device))
    t = torch.linspace(1.0, 0.0, n_bins, device=device)  # weight of the log spacing
    return t * log + (1.0 - t) * linear


def create_outputs_with_chmv2_mixlog_norm(
    input: torch.Tensor,
    bins: torch.Tensor,
    max_clamp_value: float = 1e-4,
    eps_shift: float = 1e-8,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Depth [N, 1, H, W] in metres from CHMv2 bin logits [N, n_bins, H, W]: ReLU weights made strictly
    positive by a tiny shift, normalised to sum to one, times the bins, times 8."""
    weights = torch.relu(input)
    shift = (-weights.amin(dim=1, keepdim=True)).clamp(0.0, max_clamp_value) + eps_shift
    weights = weights + shift
    total = torch.nan_to_num(weights.sum(dim=1, keepdim=True), nan=1.0, posinf=1.0, neginf=1.0).clamp_min(eps)
    weights = weights / total
    depth = (weights * bins.view(1, -1, 1, 1).clamp_min(eps)).sum(dim=1, keepdim=True).clamp_min(eps)
    return depth * CHMV2_DEPTH_SCALE
