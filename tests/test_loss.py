import pytest
import torch
import torch.nn.functional as F

from dinoseg.eval.segmentation.loss import MultiSegmentationLoss, softmax_dice_loss


def _batch(b=2, c=5, h=6, w=7, ignored=0.3):
    logits = torch.randn(b, c, h, w, requires_grad=True)
    target = torch.randint(0, c, (b, h, w))
    target[torch.rand(b, h, w) < ignored] = 255
    return logits, target


def _reference_dice(logits, target, ignore_index=255, smooth=1.0):
    """Direct per-image, per-class loop of the Dice formula over valid pixels."""
    probs = logits.softmax(1)
    losses = []
    for i in range(logits.shape[0]):
        valid = target[i] != ignore_index
        for c in range(logits.shape[1]):
            p = probs[i, c][valid]
            t = (target[i][valid] == c).float()
            losses.append(1 - (2 * (p * t).sum() + smooth) / ((p**2).sum() + (t**2).sum() + smooth))
    return torch.stack(losses).mean()


def test_ce_only_matches_cross_entropy():
    logits, target = _batch()
    loss = MultiSegmentationLoss(diceloss_weight=0.0, celoss_weight=1.0)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=255))
    loss = MultiSegmentationLoss(diceloss_weight=0.0, celoss_weight=0.5, ignore_index=3)(
        logits, target.clamp(max=4)
    )
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(logits, target.clamp(max=4), ignore_index=3))


def test_dice_matches_formula_and_weighted_sum():
    logits, target = _batch()
    dice = MultiSegmentationLoss(diceloss_weight=1.0, celoss_weight=0.0)(logits, target)
    torch.testing.assert_close(dice, _reference_dice(logits, target))
    both = MultiSegmentationLoss(diceloss_weight=0.3, celoss_weight=2.0)(logits, target)
    torch.testing.assert_close(both, 0.3 * dice + 2.0 * F.cross_entropy(logits, target, ignore_index=255))


def test_dice_is_zero_for_a_perfect_prediction():
    _, target = _batch()
    logits = 100.0 * F.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float()
    logits[:, 2][target == 255] = 1000.0  # whatever is predicted on ignored pixels must not count
    assert softmax_dice_loss(logits, target, target != 255).item() == pytest.approx(0.0, abs=1e-6)
    assert MultiSegmentationLoss(1.0, 0.0)(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_ignored_pixels_do_not_matter():
    logits, target = _batch()
    criterion = MultiSegmentationLoss(diceloss_weight=1.0, celoss_weight=1.0)
    changed = logits.detach().clone()
    changed[:, :, target[0] == 255] += 50 * torch.randn_like(changed[:, :, target[0] == 255])
    changed[1] = logits[1]
    torch.testing.assert_close(criterion(changed, target), criterion(logits, target))


def test_all_ignored_is_finite_with_zero_gradient():
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.full((2, 5, 5), 255)
    loss = MultiSegmentationLoss(diceloss_weight=1.0, celoss_weight=1.0)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_batch_size_one_and_channel_dim_target():
    logits, target = _batch(b=1)
    criterion = MultiSegmentationLoss(diceloss_weight=1.0, celoss_weight=1.0)
    plain = criterion(logits, target)
    torch.testing.assert_close(criterion(logits, target[:, None]), plain)
    expected = _reference_dice(logits, target) + F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(plain, expected)
    plain.backward()
    assert torch.isfinite(logits.grad).all()


def test_logits_are_resized_to_the_label():
    logits, _ = _batch(h=3, w=4)
    big_target = torch.randint(0, 5, (2, 6, 8))
    up = F.interpolate(logits, size=(6, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(MultiSegmentationLoss(celoss_weight=1.0)(logits, big_target), F.cross_entropy(up, big_target))


def test_bad_input_raises():
    logits, target = _batch()
    target[0, 0, 0] = 7
    with pytest.raises(ValueError, match="label value 7"):
        MultiSegmentationLoss(celoss_weight=1.0)(logits, target)
    with pytest.raises(ValueError, match="both 0"):
        MultiSegmentationLoss(0.0, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        MultiSegmentationLoss(-1.0, 1.0)
    with pytest.raises(ValueError, match="target shape"):
        MultiSegmentationLoss(celoss_weight=1.0)(logits, target[0])
