"""The deterministic training ops (`train.deterministic`) compute what the usual ops compute, with gradients."""

import pytest
import torch
import torch.nn.functional as F

from dinoseg.layers import deterministic


@pytest.fixture
def forced(monkeypatch):
    # Their CUDA-only path, on the CPU: the switch is the deterministic mode on a CUDA tensor.
    monkeypatch.setattr(deterministic, "_deterministic", lambda t: t.requires_grad)


def _both(fn, ref, *inputs):
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out, expected = fn(*a), ref(*b)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(13, 17), (4, 3), (9, 9)])
def test_resize_bilinear(forced, size, align_corners):
    x = torch.randn(2, 3, 9, 11)
    _both(lambda t: deterministic.resize_bilinear(t, size, align_corners),
          lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=align_corners), x)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(forced, weighted, reduction):
    logits = torch.randn(3, 5, 4, 6)
    target = torch.randint(0, 5, (3, 4, 6))
    target[0, 0] = 255
    weight = torch.rand(5) + 0.5 if weighted else None
    _both(lambda t: deterministic.cross_entropy(t, target, weight, 255, reduction),
          lambda t: F.cross_entropy(t, target, weight=weight, ignore_index=255, reduction=reduction), logits)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample_bilinear(forced, padding_mode, align_corners):
    x = torch.randn(2, 3, 7, 9)
    grid = torch.rand(2, 5, 4, 2) * 2.4 - 1.2  # some points outside the map
    _both(lambda t, g: deterministic.grid_sample_bilinear(t, g, padding_mode, align_corners),
          lambda t, g: F.grid_sample(t, g, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners),
          x, grid)


def test_the_usual_ops_run_otherwise():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)  # CPU: no deterministic replacement needed
    assert deterministic.resize_bilinear(x, (7, 7)).grad_fn.name().startswith("UpsampleBilinear2D")
