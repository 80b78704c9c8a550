import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinoseg.eval.segmentation.metrics import (
    SEGMENTATION_METRICS,
    SUMMARY_NAMES,
    SegmentationMetrics,
    calculate_intersect_and_union,
    calculate_segmentation_metrics,
    format_per_class_table,
)

from .conftest import load_fixture

SUMMARY = {"mIoU": "mIoU", "acc": "mAcc", "aAcc": "aAcc", "dice": "mDice", "fscore": "mFscore",
           "precision": "mPrecision", "recall": "mRecall"}  # fmt: skip


def test_summary_names_map_official_keys():
    assert SUMMARY_NAMES == SUMMARY and set(SUMMARY) == set(SEGMENTATION_METRICS)


@pytest.mark.parametrize("reduce_zero_label", [False, True])
def test_matches_official(reduce_zero_label):
    ref = load_fixture("metrics.pt")
    expected = ref[f"reduce_zero_label={reduce_zero_label}"]
    # Without reduce_zero_label the fixture's labels run up to 7 with 7 classes: the official histogram drops
    # the stray label silently, which strict=False reproduces (and the default refuses, see below).
    areas = calculate_intersect_and_union(
        ref["pred"],
        ref["label"],
        7,
        ignore_index=255,
        reduce_zero_label=reduce_zero_label,
        strict=reduce_zero_label,
    )
    assert areas.dtype == torch.int64
    torch.testing.assert_close(areas.float(), expected["intersect_union_pred_label"], atol=0, rtol=0)
    metrics = calculate_segmentation_metrics(areas)
    assert list(metrics) == ["aAcc"] + [k for k in SEGMENTATION_METRICS if k != "aAcc"]
    for key in SEGMENTATION_METRICS:
        torch.testing.assert_close(metrics[key].float(), expected[key], atol=1e-5, rtol=0)

    accumulator = SegmentationMetrics(7, reduce_zero_label=reduce_zero_label, strict=reduce_zero_label)
    for rows in torch.split(torch.arange(ref["pred"].shape[1]), 37):  # the same image in four strips
        accumulator.update(ref["pred"][:, rows], ref["label"][:, rows])
    assert accumulator.num_samples == 4
    torch.testing.assert_close(accumulator.areas, areas, atol=0, rtol=0)
    summary = accumulator.compute()
    for key, name in SUMMARY.items():
        assert summary[name] == pytest.approx(float(expected[key]), abs=1e-5)


def test_out_of_range_values_raise():
    ref = load_fixture("metrics.pt")
    with pytest.raises(ValueError, match=r"label value 7 is outside \[0, 7\)"):
        calculate_intersect_and_union(ref["pred"], ref["label"], 7)
    with pytest.raises(ValueError, match="prediction value 9"):
        calculate_intersect_and_union(torch.tensor([9, 0]), torch.tensor([1, 0]), 7)
    with pytest.raises(ValueError, match="shape"):
        calculate_intersect_and_union(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 7)


def test_known_small_case_with_nan_classes():
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 255]])
    label = torch.tensor([[0, 1, 1, 1], [255, 255, 0, 0]])
    # counted (pred, label) pairs: (0,0) (0,1) (1,1) (1,1) (0,0) (3,0); the two 255 labels are skipped
    areas = calculate_intersect_and_union(pred.clamp(max=3), label, 4)
    intersect, union, area_pred, area_label = areas
    assert intersect.tolist() == [2, 2, 0, 0]
    assert area_label.tolist() == [3, 3, 0, 0]
    assert area_pred.tolist() == [3, 2, 0, 1]
    assert union.tolist() == [4, 3, 0, 1]
    metrics = SegmentationMetrics(4, class_names=["sky", "road", "car", "tree"])
    metrics.update(pred.clamp(max=3)[None], label[None])
    per_class = metrics.per_class()
    assert math.isnan(per_class["mIoU"][2]) and per_class["mIoU"][3] == 0.0
    summary = metrics.compute()
    assert summary["mIoU"] == pytest.approx((2 / 4 + 2 / 3 + 0) / 3)
    assert summary["aAcc"] == pytest.approx(4 / 6)
    table = metrics.format_table()
    assert table.splitlines()[0].split()[:3] == ["Class", "IoU", "Acc"]
    assert "road" in table and "66.67" in table and "nan" in table.splitlines()[3]


def test_scores_are_argmaxed_and_state_is_exact_int64():
    scores = torch.randn(3, 5, 8, 8)
    label = torch.randint(0, 5, (3, 8, 8))
    a, b = SegmentationMetrics(5), SegmentationMetrics(5)
    a.update(scores, label)
    b.update(scores.argmax(1), label)
    assert a.areas.dtype == torch.int64 and torch.equal(a.areas, b.areas)
    big = SegmentationMetrics(2)
    big.areas += 2**53  # beyond float64's exact integers: int64 keeps counting exactly
    big.update(torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long))
    assert big.areas[0, 1].item() == 2**53 + 4


def test_all_reduce_guards_against_double_counting():
    metrics = SegmentationMetrics(3)
    metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    metrics.all_reduce()  # no process group: no-op
    with pytest.raises(RuntimeError, match="twice"):
        metrics.all_reduce()
    with pytest.raises(RuntimeError, match="reset"):
        metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    metrics.reset()
    assert metrics.areas.sum() == 0 and metrics.num_samples == 0


def test_table_formatter_checks_names():
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        format_per_class_table({"mIoU": torch.zeros(3)}, ["a", "b"])


def _distributed_worker(rank, world_size, init_file, preds, labels, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metrics = SegmentationMetrics(6, reduce_zero_label=True)
        for i in range(rank, len(preds), world_size):  # each rank sees its own share of the samples
            metrics.update(preds[i], labels[i])
        metrics.all_reduce()
        queue.put((rank, metrics.areas.tolist(), metrics.num_samples))  # plain data: the sender exits
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_two_gloo_processes(tmp_path):
    torch.manual_seed(0)
    preds = [torch.randint(0, 6, (1, 9, 11)) for _ in range(5)]
    labels = [torch.randint(0, 7, (1, 9, 11)) for _ in range(5)]  # 0 -> ignored, 1..6 -> 0..5
    reference = SegmentationMetrics(6, reduce_zero_label=True)
    for p, t in zip(preds, labels):
        reference.update(p, t)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), preds, labels, queue), nprocs=2, join=True)
    results = [queue.get() for _ in range(2)]
    for _, areas, num_samples in results:
        assert num_samples == 5
        assert areas == reference.areas.tolist()
