"""Drop-in replacements for the training ops whose CUDA backward has no deterministic kernel.

Under `torch.use_deterministic_algorithms(True)` (dinoseg's `train.deterministic`), PyTorch refuses to
differentiate bilinear `interpolate` and `grid_sample` on CUDA, and refuses `nll_loss` (cross-entropy) there.
These functions compute the same values with ops whose CUDA kernels are deterministic (matrix products and
`gather`, whose backward PyTorch then makes deterministic) when that mode is on and a gradient will flow through a
CUDA tensor; otherwise they call the usual op unchanged.
"""

import torch
import torch.nn.functional as F


def _deterministic(t: torch.Tensor) -> bool:
    return t.is_cuda and t.requires_grad and torch.are_deterministic_algorithms_enabled()


def _resize_matrix(size_in: int, size_out: int, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """[size_out, size_in] weights of 1-D linear interpolation, as `F.interpolate(..., size=...)` computes them
    (built on the CPU in float64: a small constant)."""
    dst = torch.arange(size_out, dtype=torch.float64)
    if align_corners:
        src = dst * ((size_in - 1) / (size_out - 1)) if size_out > 1 else torch.zeros_like(dst)
    else:
        src = ((dst + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=size_in - 1)
    frac = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=size_in - 1)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, i0), 1 - frac, accumulate=True)
    matrix.index_put_((rows, i1), frac, accumulate=True)
    return matrix.to(like.device, like.dtype)


def resize_bilinear(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=...)` for [N, C, H, W]."""
    size = tuple(size)  # no int(): under ONNX export a symbolic size would become a constant
    if not _deterministic(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    rows = _resize_matrix(x.shape[-2], size[0], align_corners, x)
    cols = _resize_matrix(x.shape[-1], size[1], align_corners, x)
    return torch.matmul(rows, torch.matmul(x, cols.t()))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy` for class logits on dim 1 and integer targets."""
    if not _deterministic(logits):
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    valid = target != ignore_index
    classes = torch.where(valid, target, torch.zeros_like(target))
    picked = F.log_softmax(logits, dim=1).gather(1, classes.unsqueeze(1)).squeeze(1)
    w = valid.to(picked.dtype) if weight is None else weight[classes] * valid
    loss = -picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w.sum()


def grid_sample_bilinear(input: torch.Tensor, grid: torch.Tensor, padding_mode: str = "zeros",
                         align_corners: bool = False) -> torch.Tensor:
    """`F.grid_sample(input, grid, mode="bilinear", ...)` for input [N, C, H, W], grid [N, Ho, Wo, 2] in [-1, 1]
    ((x, y) order), with "zeros" or "border" padding."""
    if not (_deterministic(input) or _deterministic(grid)):
        return F.grid_sample(input, grid, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners)
    N, C, H, W = input.shape
    _, Ho, Wo, _ = grid.shape

    def source(coord: torch.Tensor, size: int) -> torch.Tensor:
        pos = (coord + 1) / 2 * (size - 1) if align_corners else ((coord + 1) * size - 1) / 2
        return pos.clamp(0, size - 1) if padding_mode == "border" else pos

    x, y = source(grid[..., 0], W), source(grid[..., 1], H)
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = x - x0, y - y0
    flat = input.reshape(N, C, H * W)
    out = 0
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)  # "zeros": corners outside read 0
        index = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).long().reshape(N, 1, Ho * Wo).expand(N, C, Ho * Wo)
        values = flat.gather(2, index).reshape(N, C, Ho, Wo)
        out = out + values * (w * inside).unsqueeze(1).to(values.dtype)
    return out
