"""Depth metrics, evaluation masks and least-squares alignment: parity with the official outputs, fixed bugs."""

import math

import numpy as np
import pytest
import torch

from dinoseg.eval.depth.metrics import DEPTH_METRICS, DEPTH_METRICS_NAME, calculate_depth_metrics, make_valid_mask
from dinoseg.eval.depth.utils import align_depth_least_square

from ._depth_fixtures import TOL, load_depth_fixture

DATA = load_depth_fixture("metrics.pt")


@pytest.mark.parametrize("case", DATA["valid_masks"],
                         ids=lambda c: f"{c['eval_crop']}-{c['ignored_value']}-{c['input'].shape[0]}")
def test_valid_mask_matches_official(case):
    mask = make_valid_mask(case["input"], case["eval_crop"], ignored_value=case["ignored_value"])
    assert mask.dtype == torch.bool and torch.equal(mask, case["mask"])


@pytest.mark.parametrize("case", DATA["metrics"], ids=lambda c: f"{c['eval_crop']}-{c['eval_range'][1]}-"
                         f"{len(c['list_metrics'])}-{c['gt'].shape[0]}")
def test_metrics_match_official(case):
    values = calculate_depth_metrics(case["gt"], case["pred"], case["valid_mask"], case["list_metrics"])
    for name in DEPTH_METRICS_NAME:
        if name in case["list_metrics"]:
            torch.testing.assert_close(getattr(values, name), case["values"][name], **TOL)
        else:
            assert math.isnan(getattr(values, name))  # official: NaN, or inf for log_10


@pytest.mark.parametrize("case", DATA["lsq"], ids=lambda c: str(tuple(c["gt"].shape)))
def test_least_squares_alignment_matches_official(case):
    aligned, scale, shift = align_depth_least_square(case["gt"], case["pred"], case["valid_mask"])
    assert aligned.shape == case["pred"].shape and aligned.dtype == torch.float32
    torch.testing.assert_close(aligned, case["aligned"], **TOL)
    assert scale == pytest.approx(case["scale"].item(), rel=1e-5) and shift == pytest.approx(case["shift"].item(), rel=1e-5)
    # numpy in, numpy out
    out, np_scale, _ = align_depth_least_square(case["gt"].numpy(), case["pred"].numpy(), case["valid_mask"].numpy())
    assert isinstance(out, np.ndarray) and np_scale == pytest.approx(scale)


def test_least_squares_recovers_a_known_scale_and_shift():
    gt = torch.rand(1, 1, 40, 50) * 5 + 1
    mask = torch.rand(1, 1, 40, 50) > 0.3
    pred = (gt - 0.5) / 2.0  # gt = 2 * pred + 0.5
    pred[~mask] = 100.0  # outside the mask: ignored by the fit
    aligned, scale, shift = align_depth_least_square(gt, pred[0], mask)
    assert scale == pytest.approx(2.0, rel=1e-5) and shift == pytest.approx(0.5, abs=1e-4)
    torch.testing.assert_close(aligned[mask[0]], gt[mask], atol=1e-4, rtol=1e-5)
    low, low_scale, low_shift = align_depth_least_square(gt, pred[0], mask, max_resolution=20)
    assert low.shape == (1, 40, 50) and low_scale == pytest.approx(2.0, rel=1e-4) and low_shift == pytest.approx(0.5, abs=1e-3)


def test_least_squares_without_enough_pixels_leaves_the_prediction(caplog):
    pred = torch.rand(1, 8, 8)
    aligned, scale, shift = align_depth_least_square(torch.rand(1, 1, 8, 8), pred, torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    assert (scale, shift) == (1.0, 0.0) and torch.equal(aligned, pred)
    assert "nothing to fit" in caplog.text


def test_an_all_invalid_image_gives_nan_for_every_metric():
    """Official: silog 0 (its NaN is replaced by 0) and NaN for the others."""
    gt = torch.zeros(1, 1, 8, 8)
    values = calculate_depth_metrics(gt, torch.ones_like(gt), make_valid_mask(gt), DEPTH_METRICS)
    assert all(math.isnan(v) for v in values)


def test_silog_of_a_pure_scale_error_is_zero_not_nan():
    """With every log ratio equal, mean(d^2) - mean(d)^2 can round below 0: sqrt would give NaN."""
    gt = torch.rand(1, 1, 30, 30) * 9 + 1
    values = calculate_depth_metrics(gt, gt * 1.3, None, ["silog", "rmse_log"])
    assert values.silog.item() == pytest.approx(0.0, abs=1e-2) and not math.isnan(values.silog)
    assert values.rmse_log.item() == pytest.approx(math.log(1.3), rel=1e-4)


def test_without_a_mask_zero_depth_is_not_scored():
    """Official: valid_mask=None scores every pixel, zeros included (AbsRel becomes inf)."""
    gt = torch.rand(1, 1, 16, 16) + 1
    gt[..., :4, :] = 0
    pred = torch.full_like(gt, 1.5)
    ours = calculate_depth_metrics(gt, pred, None, DEPTH_METRICS)
    masked = calculate_depth_metrics(gt, pred, gt > 0, DEPTH_METRICS)
    for name in DEPTH_METRICS_NAME:
        torch.testing.assert_close(getattr(ours, name), getattr(masked, name))
    official = calculate_depth_metrics(gt, pred, None, DEPTH_METRICS, keep_all_without_mask=True)
    assert math.isinf(official.abs_rel)


def test_metric_names_are_accepted_and_unknown_ones_are_errors():
    values = calculate_depth_metrics(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4), None, ["rmse", "a1"])
    assert values.rmse.item() == 0.0 and values.a1.item() == 1.0 and math.isnan(values.mae)
    with pytest.raises(ValueError, match="unknown depth metric 'delta1'"):
        calculate_depth_metrics(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4), None, ["delta1"])
    lower = {m.name for m in DEPTH_METRICS if m.is_lower_better}
    assert lower == {"abs_rel", "rmse", "log_10", "rmse_log", "silog", "sq_rel", "mae"}


@pytest.mark.parametrize("crop, rows, cols", [
    ("NYU_EIGEN", (45, 471), (41, 601)),
    ("KITTI_GARG", (153, 371), (44, 1197)),  # Garg et al. on a 375 x 1242 KITTI frame
    ("KITTI_EIGEN", (124, 342), (44, 1197)),
])
def test_eval_crops_at_their_reference_sizes(crop, rows, cols):
    h, w = (480, 640) if crop == "NYU_EIGEN" else (375, 1242)
    mask = make_valid_mask(torch.ones(1, 1, h, w), crop)[0, 0]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert (ys.min().item(), ys.max().item() + 1) == rows and (xs.min().item(), xs.max().item() + 1) == cols
    assert mask.sum() == (rows[1] - rows[0]) * (cols[1] - cols[0])
    with pytest.raises(ValueError, match="unknown eval crop 'GARG'"):
        make_valid_mask(torch.ones(1, 1, 4, 4), "GARG")
