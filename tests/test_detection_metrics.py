"""COCO box evaluation: our numbers are pycocotools' (run independently on the written detections.json), perfect
detections score 1, nothing detected scores 0, subsets, crowd regions and images without boxes as COCO does, and
the detector outputs -> COCO results conversion maps boxes and non-contiguous category ids back exactly."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dinoseg.data import CocoJson, SyntheticBoxes
from dinoseg.eval.detection.metrics import (
    COCO_STAT_NAMES,
    CocoEvaluator,
    evaluate_detections,
    to_coco_results,
    write_detections,
)
from dinoseg.eval.detection.transforms import make_detection_eval_transforms
from dinoseg.eval.detection.util.box_ops import box_cxcywh_to_xyxy


def pycocotools_stats(ann_file, det_file, image_ids=None) -> np.ndarray:
    """The reference: pycocotools on the files, as the COCO tooling runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        evaluator = COCOeval(gt, gt.loadRes(str(det_file)), "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def as_array(stats: dict) -> np.ndarray:
    return np.asarray([-1.0 if math.isnan(stats[k]) else stats[k] for k in COCO_STAT_NAMES])


def noisy_detections(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered true boxes, some with the wrong category, plus false positives, with random scores."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    sizes = {i["id"]: (i["width"], i["height"]) for i in gt["images"]}
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.uniform() < 0.8 else int(rng.choice(cats))
        dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x + jitter[0], y + jitter[1],
                     max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)], "score": float(rng.uniform())})
    for image_id, (w, h) in sizes.items():
        for _ in range(2):
            bx, by = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
            dets.append({"image_id": image_id, "category_id": int(rng.choice(cats)), "bbox": [bx, by, 10.0, 10.0],
                         "score": float(rng.uniform(0, 0.5))})
    return dets


@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory):
    """A synthetic split written as a COCO folder: (dataset read back, annotation file)."""
    ds = SyntheticBoxes("val", num_samples=12, image_size=96, seed=5)
    images, ann_file = ds.write_coco(str(tmp_path_factory.mktemp("coco")))
    return CocoJson(images, ann_file), ann_file


def test_stats_equal_pycocotools_on_the_written_detections(synthetic_coco, tmp_path, capsys):
    dataset, ann_file = synthetic_coco
    detections = noisy_detections(dataset.coco_gt())
    det_file = write_detections(tmp_path / "detections.json", detections)
    assert json.loads(det_file.read_text()) == detections
    metrics = CocoEvaluator(dataset).evaluate(detections)
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured
    reference = pycocotools_stats(ann_file, det_file)
    np.testing.assert_allclose(as_array(metrics.stats), reference.stats, rtol=0, atol=1e-12)
    assert 0.1 < metrics.stats["AP"] < 0.9 and set(metrics.stats) == set(COCO_STAT_NAMES)
    precision = reference.eval["precision"]
    for k, cat in enumerate(reference.params.catIds):
        p = precision[:, :, k, 0, -1]
        assert metrics.per_category_ap[dataset.category_names[cat]] == pytest.approx(float(p[p > -1].mean()), abs=1e-12)
    assert "Average Precision" in metrics.summary and metrics.num_images == 12 and metrics.num_detections == len(detections)
    # the same from the annotation file and from a COCO dict
    for ground_truth in (ann_file, json.loads(open(ann_file).read())):
        np.testing.assert_array_equal(as_array(evaluate_detections(ground_truth, detections).stats), as_array(metrics.stats))
    assert json.loads(json.dumps(metrics.to_dict()))["APl"] is None  # no large object: NaN, written as null


def test_perfect_detections_score_one_and_none_score_zero(synthetic_coco):
    dataset, _ = synthetic_coco
    gt = dataset.coco_gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    metrics = evaluate_detections(dataset, perfect)
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert metrics.stats[key] == pytest.approx(1.0, abs=1e-12), key  # pycocotools: tp / (tp + eps)
    assert list(metrics.per_category_ap.values()) == pytest.approx([1.0] * 4, abs=1e-12)
    nothing = evaluate_detections(dataset, [])
    assert nothing.stats["AP"] == 0.0 and nothing.stats["AR100"] == 0.0 and nothing.num_detections == 0
    assert set(nothing.per_category_ap.values()) == {0.0}


def test_a_subset_of_the_images_is_evaluated_as_pycocotools_does(synthetic_coco, tmp_path):
    dataset, ann_file = synthetic_coco
    detections = noisy_detections(dataset.coco_gt(), seed=1)
    subset = [2, 5, 6, 11]
    mine = [d for d in detections if d["image_id"] in subset]
    metrics = CocoEvaluator(ann_file).evaluate(mine, image_ids=subset)
    reference = pycocotools_stats(ann_file, write_detections(tmp_path / "d.json", mine), subset)
    np.testing.assert_allclose(as_array(metrics.stats), reference.stats, rtol=0, atol=1e-12)
    assert metrics.num_images == 4
    assert metrics.stats["AP"] != CocoEvaluator(ann_file).evaluate(detections).stats["AP"]
    with pytest.raises(ValueError, match="detection #.*: image_id 1 is not one of the evaluated images"):
        CocoEvaluator(ann_file).evaluate(detections, image_ids=subset)
    with pytest.raises(ValueError, match=r"image ids \[999\] are not in the ground truth"):
        CocoEvaluator(ann_file).evaluate([], image_ids=[1, 999])


def gt_with_crowd_and_an_empty_image() -> dict:
    return {
        "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 100, "height": 80}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 30, 40, 40], "area": 1600, "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}],
    }


def test_crowd_regions_and_images_without_boxes(tmp_path):
    gt = gt_with_crowd_and_an_empty_image()
    hit = {"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "score": 0.9}
    in_crowd = {"image_id": 1, "category_id": 3, "bbox": [55, 35, 30, 30], "score": 0.95}
    on_empty = {"image_id": 2, "category_id": 3, "bbox": [10, 10, 30, 20], "score": 0.95}
    evaluator = CocoEvaluator(gt)
    # a detection inside a crowd region is neither a hit nor a false positive: AP stays 1
    assert evaluator.evaluate([hit, in_crowd]).stats["AP"] == pytest.approx(1.0, abs=1e-12)
    not_crowd = gt_with_crowd_and_an_empty_image()
    not_crowd["annotations"][1]["iscrowd"] = 0  # an ordinary box there: the same detections score lower
    assert CocoEvaluator(not_crowd).evaluate([hit, in_crowd]).stats["AP"] < 0.9
    # the same box on an image without annotations is a false positive that outranks the hit
    with_fp = evaluator.evaluate([hit, on_empty])
    assert with_fp.stats["AP"] < 1.0
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    reference = pycocotools_stats(tmp_path / "gt.json", write_detections(tmp_path / "d.json", [hit, on_empty]))
    np.testing.assert_allclose(as_array(with_fp.stats), reference.stats, rtol=0, atol=1e-12)
    assert with_fp.per_category_ap["cat"] == with_fp.stats["AP"] and math.isnan(with_fp.per_category_ap["dog"])
    # only the image without annotations: nothing is defined
    assert math.isnan(evaluator.evaluate([on_empty], image_ids=[2]).stats["AP"])


def test_bad_detections_are_errors_not_silent_zeros():
    evaluator = CocoEvaluator(gt_with_crowd_and_an_empty_image())
    with pytest.raises(ValueError, match=r"detection #0: category_id 0 is not a category of the ground truth \(\[3, 8\]\)"):
        evaluator.evaluate([{"image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2], "score": 0.5}])
    with pytest.raises(ValueError, match=r"detection #0 is not a COCO result"):
        evaluator.evaluate([{"image_id": 1, "bbox": [1, 1, 2, 2], "score": 0.5}])
    with pytest.raises(ValueError, match=r"must be 4 \+ 1 finite numbers"):
        evaluator.evaluate([{"image_id": 1, "category_id": 3, "bbox": [1, 1, 2, float("nan")], "score": 0.5}])


@pytest.mark.parametrize("reparam", [False, True])
@pytest.mark.parametrize("category_ids_as_labels", [False, True])
def test_outputs_back_to_original_pixels_and_category_ids(tmp_path, reparam, category_ids_as_labels):
    """Round trip: the eval transform's targets, read as a detector's post-processed outputs (boxes XYXY in the
    network input's pixels, labels), come back as the file's boxes and non-contiguous category ids."""
    images = [{"id": 10, "file_name": "a.png", "height": 90, "width": 120},
              {"id": 20, "file_name": "b.png", "height": 75, "width": 50}]
    anns = [{"id": 1, "image_id": 10, "category_id": 90, "bbox": [10.5, 20, 40, 30]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [60, 5, 50, 80]},
            {"id": 3, "image_id": 20, "category_id": 1, "bbox": [0, 0, 50, 75]}]
    cats = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 90, "name": "toothbrush"}]
    (tmp_path / "im").mkdir()
    for img in images:
        Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(tmp_path / "im" / img["file_name"])
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    dataset = CocoJson(str(tmp_path / "im"), str(tmp_path / "gt.json"), category_ids_as_labels=category_ids_as_labels,
                       transforms=make_detection_eval_transforms(size=64, max_size=100, reparam=reparam))
    outputs, targets = [], []
    for i in range(len(dataset)):
        _, target = dataset[i]
        h, w = target["size"].tolist()
        boxes = box_cxcywh_to_xyxy(target["boxes"]) * (1 if reparam else torch.tensor([w, h, w, h]))
        labels = target["labels"]
        outputs.append({"scores": torch.linspace(0.9, 0.5, len(labels)), "labels": labels, "boxes": boxes})
        targets.append(target)
    # a label that is no category (an unused id of a 91-class head) is dropped
    outputs[0] = {k: torch.cat([v, v[:1]]) for k, v in outputs[0].items()}
    outputs[0]["labels"][-1] = 2 if category_ids_as_labels else 7
    results = to_coco_results(outputs, targets, dataset.label_to_category_id)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(10, 90), (10, 3), (20, 1)]
    for r, a in zip(results, anns):
        np.testing.assert_allclose(r["bbox"], a["bbox"], atol=1e-4)
    assert evaluate_detections(dataset, results).stats["AP"] == pytest.approx(1.0, abs=1e-12)  # tp / (tp + eps)
    if category_ids_as_labels:  # labels are category ids already
        assert [r["category_id"] for r in to_coco_results(outputs[1:], targets[1:])] == [1]


def test_boxes_beyond_the_image_are_clamped():
    target = {"image_id": torch.tensor(5), "size": torch.tensor([40, 50]), "orig_size": torch.tensor([80, 100])}
    out = {"scores": torch.tensor([0.5]), "labels": torch.tensor([0]), "boxes": torch.tensor([[-5.0, 10, 60, 30]])}
    (result,) = to_coco_results([out], [target], {0: 7})
    assert result == {"image_id": 5, "category_id": 7, "bbox": [0.0, 20.0, 100.0, 40.0], "score": 0.5}
    with pytest.raises(ValueError, match="1 outputs for 2 targets"):
        to_coco_results([out], [target, target])
