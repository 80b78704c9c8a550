"""Depth losses: parity with the official values and gradients, and the fixed official bugs."""

import pytest
import torch

from dinoseg.eval.depth.loss import GradientLogLoss, GradientLoss, L1Loss, LossType, MultiLoss, SigLoss

from ._depth_fixtures import TOL, load_depth_fixture

# Fixture names -> constructors, with the official behaviour for valid_mask=None (keep every pixel).
OFFICIAL = dict(keep_all_without_mask=True)
LOSSES = {
    "SigLoss(warm_up=False)": lambda: SigLoss(warm_up=False, **OFFICIAL),
    "SigLoss(warm_up=True,warm_iter=2)": lambda: SigLoss(warm_up=True, warm_iter=2, **OFFICIAL),
    "LossType.SIGLOSS.module()": lambda: LossType.SIGLOSS.module(**OFFICIAL),
    "GradientLoss()": lambda: GradientLoss(**OFFICIAL),
    "GradientLogLoss()": lambda: GradientLogLoss(**OFFICIAL),
    "L1Loss()": lambda: L1Loss(**OFFICIAL),
    "MultiLoss({SIGLOSS: 1.0})": lambda: MultiLoss({LossType.SIGLOSS: 1.0}, **OFFICIAL),
    "MultiLoss({SIGLOSS: 1.0, GRADIENT_LOG_LOSS: 0.5})": lambda: MultiLoss(
        {LossType.SIGLOSS: 1.0, LossType.GRADIENT_LOG_LOSS: 0.5}, **OFFICIAL),
    "MultiLoss({L1: 1.0, GRADIENT_LOSS: 0.25})": lambda: MultiLoss({LossType.L1: 1.0, LossType.GRADIENT_LOSS: 0.25}, **OFFICIAL),
}
DATA = load_depth_fixture("losses.pt")


@pytest.mark.parametrize("case", DATA["cases"], ids=lambda c: f"{c['loss']}-{c['mask']}")
def test_loss_values_and_gradients_match_official(case):
    loss = LOSSES[case["loss"]]()
    mask = None if case["mask"] == "none" else DATA["masks"][case["mask"]]
    grads = []
    for expected in case["values"]:
        pred = DATA["pred"].clone().requires_grad_(True)
        value = loss(pred, DATA["target"], mask)
        value.backward()
        torch.testing.assert_close(value.detach(), expected, **TOL)
        grads.append(pred.grad)
    torch.testing.assert_close(grads[0], case["grad_first"], **TOL)
    torch.testing.assert_close(grads[-1], case["grad_last"], **TOL)


def test_every_fixture_case_is_covered():
    assert {c["loss"] for c in DATA["cases"]} == set(LOSSES)
    assert {c["mask"] for c in DATA["cases"]} == {"none", "make_valid_mask_full", "in_range", "in_range_eigen"}


@pytest.mark.parametrize("make", [lambda: SigLoss(warm_up=False), GradientLoss, GradientLogLoss, L1Loss,
                                  lambda: MultiLoss({"SIGLOSS": 1.0, "GRADIENT_LOSS": 0.5})])
def test_without_a_mask_missing_depth_is_left_out(make):
    """Official: valid_mask=None scores every pixel, including the zeros that mean 'no measurement'."""
    pred, target = DATA["pred"], DATA["target"]
    assert (target == 0).any()
    torch.testing.assert_close(make()(pred, target), make()(pred, target, target > 0))
    every_pixel = torch.ones_like(target, dtype=torch.bool)
    assert not torch.allclose(make()(pred, target), make()(pred, target, every_pixel))


@pytest.mark.parametrize("loss", [GradientLoss(), GradientLogLoss(), SigLoss(warm_up=False), L1Loss()])
def test_an_empty_mask_gives_zero_and_a_finite_gradient(loss):
    """Official: GradientLoss / GradientLogLoss divide 0 by 0 (NaN), SigLoss takes the mean of nothing (NaN)."""
    pred = DATA["pred"].clone().requires_grad_(True)
    value = loss(pred, DATA["target"], torch.zeros_like(DATA["target"], dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_gradient_loss_skips_only_the_empty_scales():
    """A mask with pixels only on odd rows / columns is empty at every subsampled scale: those add 0, the full
    scale keeps its official value."""
    pred, target = DATA["pred"], DATA["target"]
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[..., 1::2, 1::2] = True
    full_scale_only = GradientLoss()(pred, target, mask)
    assert torch.isfinite(full_scale_only) and full_scale_only > 0
    diff = (pred - target) * mask
    expected = ((diff[..., :-2, :] - diff[..., 2:, :]).abs() * (mask[..., :-2, :] & mask[..., 2:, :])).sum()
    expected += ((diff[..., :, :-2] - diff[..., :, 2:]).abs() * (mask[..., :, :-2] & mask[..., :, 2:])).sum()
    torch.testing.assert_close(full_scale_only, expected / mask.sum())


def test_sigloss_warm_up_counts_calls_per_instance():
    pred, target = DATA["pred"], DATA["target"]
    warm = SigLoss(warm_up=True, warm_iter=2)
    values = [warm(pred, target).item() for _ in range(3)]
    assert values[0] == values[1] != values[2]
    assert values[2] == pytest.approx(SigLoss(warm_up=False)(pred, target).item())


def test_multiloss_accepts_loss_names_and_needs_one():
    weighted = MultiLoss({"sigloss": 2.0})
    assert weighted.dict_weights == {"SIGLOSS": 2.0}
    with pytest.raises(ValueError, match="no loss given"):
        MultiLoss({})
