"""Detection data: COCO-format datasets (the official layout, any export, the synthetic set), their faults named by
file and annotation, Plain-DETR's box-aware transforms, padded batches, and check-data for detection."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torchvision import tv_tensors

from dinoseg.data import COCO, DATASETS, CocoJson, DatasetError, SyntheticBoxes, make_dataset
from dinoseg.data.check import main as check_main
from dinoseg.data.detection_check import check_detection_dataset
from dinoseg.eval.detection.transforms import (
    RandomSizeCrop,
    make_detection_eval_transforms,
    make_detection_train_transforms,
    resized_size,
)
from dinoseg.eval.detection.util.misc import NestedTensor, collate_fn


def write_coco(tmp_path, images, annotations, categories, *, extra=None, folder="images", name="ann.json"):
    """A COCO file at tmp_path/name and its images (gray PNGs of the given (file_name, height, width)) under
    tmp_path/folder; `images` entries are dicts written as given (sizes taken from them or from `_size`)."""
    root = tmp_path / folder
    for img in images:
        h, w = img.pop("_size", (img.get("height"), img.get("width")))
        path = root / img["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)
    data = {"images": images, "annotations": annotations, "categories": categories, **(extra or {})}
    (tmp_path / name).write_text(json.dumps(data))
    return str(root), str(tmp_path / name)


def image(iid, name, h=40, w=60, **kw):
    return {"id": iid, "file_name": name, "height": h, "width": w, **kw}


def box(aid, iid, cid, bbox, **kw):
    return {"id": aid, "image_id": iid, "category_id": cid, "bbox": bbox, **kw}


CATS = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 90, "name": "toothbrush"}]


# --- SyntheticBoxes ---------------------------------------------------------------------------------------------
def test_synthetic_boxes_are_deterministic_and_exact():
    ds = SyntheticBoxes("train", num_samples=12, image_size=96, seed=3)
    again = SyntheticBoxes("train", num_samples=12, image_size=96, seed=3)
    other = SyntheticBoxes("val", num_samples=12, image_size=96, seed=3)
    assert ds.category_ids == [1, 3, 5, 7] and ds.num_classes == 4
    assert ds.label_to_category_id == {0: 1, 1: 3, 2: 5, 3: 7} and ds.class_names[0] == "red disk"
    counts = []
    for i in range(len(ds)):
        img, target = ds[i]
        img2, target2 = again[i]
        assert torch.equal(img, img2) and torch.equal(target["boxes"], target2["boxes"])
        ann = ds.annotations(i)
        counts.append(len(ann.boxes))
        assert 1 <= len(ann.boxes) <= 4 and target["image_id"].item() == i + 1
        assert torch.equal(target["labels"], torch.as_tensor([ds.category_id_to_label[c] for c in ann.category_ids]))
        # every box is exactly the extent of one drawn (saturated) object
        rgb = img.permute(1, 2, 0).numpy().astype(int)
        objects, n = ndimage.label(rgb.max(2) - rgb.min(2) > 90, structure=np.ones((3, 3)))
        found = sorted((s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(objects))
        assert n == len(ann.boxes)
        assert found == sorted(tuple(int(v) for v in b) for b in target["boxes"].tolist())
        sizes = ann.boxes[:, 2:]
        assert sizes.min() >= 0.2 * 96 and sizes.max() <= 0.5 * 96
    assert not torch.equal(ds[0][0], other[0][0])
    assert max(counts) > 1


def test_synthetic_boxes_written_as_coco_read_back_identical(tmp_path):
    ds = SyntheticBoxes("val", num_samples=6, image_size=64, seed=1, num_classes=3)
    images, annotations = ds.write_coco(str(tmp_path / "coco"))
    back = make_dataset(f"CocoJson:images={images}:annotations={annotations}")
    assert isinstance(back, CocoJson) and len(back) == 6
    assert back.category_ids == ds.category_ids and back.class_names == ds.class_names
    assert back.label_to_category_id == ds.label_to_category_id
    for i in range(6):
        (a, ta), (b, tb) = ds[i], back[i]
        assert torch.equal(a, b)
        for key in ("boxes", "labels", "image_id", "orig_size", "size"):
            assert torch.equal(ta[key], tb[key]), key
    assert back.coco_gt()["annotations"] == ds.coco_gt()["annotations"]
    with pytest.raises(DatasetError, match="exists"):
        ds.write_coco(str(tmp_path / "coco"))


def test_detection_datasets_are_registered():
    assert DATASETS["coco"] is COCO and DATASETS["cocojson"] is CocoJson and DATASETS["syntheticboxes"] is SyntheticBoxes
    ds = make_dataset("SyntheticBoxes:split=TRAIN:num_samples=3:image_size=48")
    assert ds.split == "train" and ds.image_size == (48, 48)


# --- CocoJson: what exporters write -----------------------------------------------------------------------------
def test_cocojson_tolerates_what_exporters_write(tmp_path):
    # Roboflow: a super-category of id 0, extra keys, no iscrowd / area / segmentation; sub-folders; an image
    # without annotations; an image without width / height (read from the file).
    cats = [{"id": 0, "name": "animals", "supercategory": "none"}, {"id": 1, "name": "cat", "supercategory": "animals"},
            {"id": 2, "name": "dog", "supercategory": "animals"}]
    images = [image(7, "a/b/one.jpg", extra_key=1, license=4), image(8, "two.png"),
              {"id": 9, "file_name": "three.png", "_size": (30, 20)}]
    anns = [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [10, 5, 20, 10], "segmentation": [], "attributes": {}},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 60, 40], "area": 2400.0},
            {"id": 5, "image_id": 9, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0}]
    root, ann = write_coco(tmp_path, images, anns, cats, extra={"info": {"year": 2024}, "licenses": []})
    ds = CocoJson(root, ann)
    assert ds.num_classes == 3 and ds.class_names == ["animals", "cat", "dog"] and ds.category_ids == [0, 1, 2]
    assert [ds.sample_name(i) for i in range(3)] == ["a/b/one.jpg", "two.png", "three.png"]
    img, target = ds[0]
    assert img.shape == (3, 40, 60) and img.dtype == torch.uint8
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [0, 0, 60, 40]] and target["labels"].tolist() == [2, 1]
    assert target["image_id"].item() == 7 and target["orig_size"].tolist() == [40, 60] == target["size"].tolist()
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert ds.annotations(2).height == 30 and ds.annotations(2).width == 20
    gt = ds.coco_gt()
    assert [a["area"] for a in gt["annotations"]] == [200.0, 2400.0, 12.0] and {a["iscrowd"] for a in gt["annotations"]} == {0}


def test_category_ids_as_labels_for_a_91_class_head(tmp_path):
    root, ann = write_coco(tmp_path, [image(1, "x.png")], [box(1, 1, 90, [1, 1, 5, 5]), box(2, 1, 3, [2, 2, 5, 5])], CATS)
    contiguous = CocoJson(root, ann)
    assert contiguous.num_classes == 3 and contiguous[0][1]["labels"].tolist() == [2, 1]
    raw = make_dataset(f"CocoJson:images={root}:annotations={ann}:category_ids_as_labels=true")
    assert raw.num_classes == 91 and raw[0][1]["labels"].tolist() == [90, 3]
    assert raw.class_names[90] == "toothbrush" and raw.class_names[2] == "N/A" and len(raw.class_names) == 91
    assert raw.label_to_category_id == {1: 1, 3: 3, 90: 90} == raw.category_id_to_label


def test_crowd_and_empty_boxes_never_reach_the_targets(tmp_path):
    anns = [box(1, 1, 1, [10, 10, 20, 10]), box(2, 1, 3, [0, 0, 50, 30], iscrowd=1),
            box(3, 1, 1, [5, 5, 0, 8]), box(4, 1, 3, [40.5, 30.5, 20, 10])]  # no width; 0.5 px out (clamped)
    root, ann = write_coco(tmp_path, [image(1, "x.png")], anns, CATS)
    ds = CocoJson(root, ann)  # strict: a box without area is a warning, not a fault
    _, target = ds[0]
    assert target["boxes"].tolist() == [[10, 10, 30, 20], [40.5, 30.5, 60, 40]] and target["labels"].tolist() == [0, 1]
    assert len(ds.warnings) == 1 and "annotation 3 (image 1, x.png)" in ds.warnings[0][1] and "no area" in ds.warnings[0][1]
    gt = ds.coco_gt()  # the evaluation keeps them all, as the file gives them (pycocotools ignores crowd regions)
    assert [(a["id"], a["iscrowd"]) for a in gt["annotations"]] == [(1, 0), (2, 1), (3, 0), (4, 0)]


FAULTS = {
    "outside": ([box(1, 1, 1, [50, 10, 20, 10])], "annotation 1 (image 1, x.png): bbox [50, 10, 20, 10] (XYWH) lies "
                                                  "outside the 60 x 40 (W x H) image"),
    "negative": ([box(2, 1, 1, [5, 5, -3, 4])], "annotation 2 (image 1, x.png): bbox [5, 5, -3, 4] (XYWH) has a "
                                                "negative width"),
    "not4": ([box(3, 1, 1, [5, 5, 3])], "annotation 3 (image 1, x.png): bbox [5, 5, 3] is not four finite numbers"),
    "category": ([box(4, 1, 2, [5, 5, 3, 3])], "annotation 4 (image 1): unknown category id 2 (not in 'categories')"),
    "image_id": ([box(5, 77, 1, [5, 5, 3, 3])], "annotation 5: unknown image id 77 (not in 'images')"),
    "dup_ann": ([box(6, 1, 1, [5, 5, 3, 3]), box(6, 1, 1, [6, 6, 3, 3])], "duplicate annotation id 6"),
    "nan": ([box(7, 1, 1, [5, 5, float("nan"), 3])], "annotation 7 (image 1, x.png): bbox [5, 5, nan, 3] is not four "
                                                      "finite numbers"),
    "string": ([box(8, 1, 1, [5, "5", 3, 3])], "annotation 8 (image 1, x.png): bbox [5, '5', 3, 3] is not four"),
    "iscrowd": ([box(9, 1, 1, [5, 5, 3, 3], iscrowd=2)], "annotation 9 (image 1, x.png): iscrowd 2 must be 0 or 1"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_strict_refuses_each_bad_annotation_in_one_line(tmp_path, fault):
    anns, message = FAULTS[fault]
    root, ann = write_coco(tmp_path, [image(1, "x.png")], anns, CATS)
    with pytest.raises(DatasetError) as err:
        CocoJson(root, ann)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"CocoJson: {ann}: ") and message in text
    loose = CocoJson(root, ann, strict=False)  # kept for check-data, the faulty annotation left out
    assert [p for p, f in loose.problems if message in f] == [ann]
    assert loose.annotations(0).annotation_ids.tolist() == ([6] if fault == "dup_ann" else [])


def test_image_faults_name_the_file(tmp_path):
    images = [image(1, "x.png"), image(1, "again.png"), image(2, "gone.png"), image(3, "notimage.png")]
    root, ann = write_coco(tmp_path, images[:2] + images[3:], [box(1, 2, 1, [1, 1, 2, 2])], CATS)
    (tmp_path / "images" / "notimage.png").write_bytes(b"not an image at all")
    json_data = json.loads((tmp_path / "ann.json").read_text())
    json_data["images"].insert(2, images[2])
    (tmp_path / "ann.json").write_text(json.dumps(json_data))
    with pytest.raises(DatasetError, match=r"duplicate image id 1 \(again.png\)"):
        CocoJson(root, ann)
    ds = CocoJson(root, ann, strict=False)
    gone = os.path.join(root, "gone.png")
    assert (gone, f"missing image (image id 2 in {ann})") in ds.problems
    assert not any("annotation 1" in f for _, f in ds.problems)  # the missing image's boxes go with it, unreported
    assert [ds.sample_name(i) for i in range(len(ds))] == ["x.png", "notimage.png"]
    with pytest.raises(DatasetError, match=r"notimage.png: unreadable or corrupt image"):
        ds[1]


def test_one_line_errors_for_files(tmp_path):
    root, ann = write_coco(tmp_path, [image(1, "x.png")], [], CATS)
    with pytest.raises(DatasetError, match=r"annotation file not found: .*nope.json"):
        CocoJson(root, str(tmp_path / "nope.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"list.json: expected a COCO mapping"):
        CocoJson(root, str(tmp_path / "list.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad.json: not a readable JSON file"):
        CocoJson(root, str(tmp_path / "bad.json"))
    (tmp_path / "nocat.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match=r"nocat.json: no 'categories' list"):
        CocoJson(root, str(tmp_path / "nocat.json"))
    with pytest.raises(DatasetError, match=r"image folder not found: .*nowhere"):
        CocoJson(str(tmp_path / "nowhere"), ann)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images" / "x.png")  # not the 40 x 60 given
    with pytest.raises(DatasetError, match=r"x.png: image/annotations size mismatch: annotations is \(40, 60\)"):
        CocoJson(root, ann)[0]


def test_coco_official_layout(tmp_path):
    (tmp_path / "annotations").mkdir()
    write_coco(tmp_path, [image(139, "000000000139.jpg")], [box(1, 139, 90, [1, 1, 9, 9])], CATS, folder="val2017",
               name="annotations/instances_val2017.json")
    ds = make_dataset("COCO:split=VAL", default_root=str(tmp_path))
    assert isinstance(ds, COCO) and ds.root == str(tmp_path) and ds.split == "val" and len(ds) == 1
    assert ds[0][1]["labels"].tolist() == [2] and ds.image_path(0) == str(tmp_path / "val2017" / "000000000139.jpg")
    assert make_dataset(f"COCO:root={tmp_path}:split=val:category_ids_as_labels=true").num_classes == 91
    with pytest.raises(DatasetError, match=r"annotation file not found: .*annotations/instances_train2017.json"):
        make_dataset(f"COCO:root={tmp_path}:split=train")
    with pytest.raises(DatasetError, match="COCO: unknown split 'test'"):
        COCO(str(tmp_path), "test")


# --- check-data ----------------------------------------------------------------------------------------------
def test_check_data_names_every_bad_annotation_and_counts_boxes(tmp_path, capsys):
    images = [image(1, "x.png"), image(2, "y.png"), image(3, "gone.png", _size=(1, 1)), image(4, "z.png"),
              image(5, "small.png", _size=(20, 20))]
    anns = [box(1, 1, 1, [1, 1, 5, 5]), box(2, 1, 3, [0, 0, 30, 30], iscrowd=1), box(3, 2, 3, [2, 2, 5, 5]),
            box(4, 2, 4, [2, 2, 5, 5]), box(5, 2, 1, [55, 2, 10, 5]), box(6, 2, 1, [2, 2, 5, -1]),
            box(7, 99, 1, [2, 2, 5, 5]), box(7, 2, 1, [1, 1, 1, 1]), box(8, 2, 1, [3, 3, 0, 2])]
    root, ann = write_coco(tmp_path, images, anns, CATS)
    os.remove(os.path.join(root, "gone.png"))
    (tmp_path / "images" / "z.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    code = check_main([f"CocoJson:images={root}:annotations={ann}", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    expected = [
        f"{ann}: annotation 4 (image 2): unknown category id 4",
        f"{ann}: annotation 5 (image 2, y.png): bbox [55, 2, 10, 5] (XYWH) lies outside the 60 x 40",
        f"{ann}: annotation 6 (image 2, y.png): bbox [2, 2, 5, -1] (XYWH) has a negative height",
        f"{ann}: annotation 7: unknown image id 99",
        f"{ann}: duplicate annotation id 7",
        f"{os.path.join(root, 'gone.png')}: missing image (image id 3 in {ann})",
        f"{os.path.join(root, 'z.png')}: unreadable or corrupt image",
        f"{os.path.join(root, 'small.png')}: image/annotations size mismatch: annotations is (40, 60) (H, W) but image",
        f"{ann}: annotation 8 (image 2, y.png): bbox [3, 3, 0, 2] (XYWH) has no area",
    ]
    for line in expected:
        assert any(line in row for row in out.splitlines()), (line, out)
    assert "8 problem(s):" in out and "1 warning(s):" in out
    report = check_detection_dataset(make_dataset(f"CocoJson:images={root}:annotations={ann}", strict=False))
    assert report.num_usable == 2 and report.boxes == {1: 2, 3: 1, 90: 0} and report.crowd_boxes == {1: 0, 3: 1, 90: 0}
    assert report.images == {1: 2, 3: 1, 90: 0}
    row = next(r for r in out.splitlines() if "toothbrush" in r)
    assert "<- never occurs" in row and "Per-category boxes of the 2 images without problems: 3 boxes, 1 crowd" in out


def test_check_data_on_a_clean_dataset_passes(capsys):
    assert check_main(["SyntheticBoxes:split=val:num_samples=4:image_size=48", "--no-progress"]) == 0
    assert "No problems found." in capsys.readouterr().out


# --- transforms and batches ------------------------------------------------------------------------------------
def _two_objects(h=60, w=90):
    """An image with a red and a blue rectangle, and their target."""
    img = torch.full((3, h, w), 128, dtype=torch.uint8)
    img[:, 10:30, 5:25] = torch.tensor([230, 20, 20], dtype=torch.uint8)[:, None, None]
    img[:, 35:55, 60:88] = torch.tensor([20, 20, 230], dtype=torch.uint8)[:, None, None]
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[5.0, 10, 25, 30], [60, 35, 88, 55]]), format="XYXY",
                                     canvas_size=(h, w))
    target = {"boxes": boxes, "labels": torch.tensor([0, 1]), "image_id": torch.tensor(4),
              "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
    return img, target


def test_eval_transform_resizes_the_short_side_and_the_boxes():
    img, target = _two_objects()
    plain = make_detection_eval_transforms(size=40, max_size=100)
    out, t = plain(img, target)
    assert out.shape == (3, 40, 60) and out.dtype == torch.float32 and t["size"].tolist() == [40, 60]
    assert t["orig_size"].tolist() == [60, 90] and t["image_id"].item() == 4 and t["labels"].tolist() == [0, 1]
    cxcywh = torch.tensor([[15.0, 20, 20, 20], [74, 45, 28, 20]])
    torch.testing.assert_close(t["boxes"], cxcywh / torch.tensor([90.0, 60, 90, 60]))
    _, t = make_detection_eval_transforms(size=40, max_size=100, reparam=True)(img, target)
    torch.testing.assert_close(t["boxes"], cxcywh * 40 / 60)
    out, t = make_detection_eval_transforms(size=40, max_size=45)(img, target)  # the long side caps the size
    assert out.shape == (3, 30, 45)
    # normalised with the ImageNet mean / std; 0-255 values as the official configs give them are recognised
    gray = (128 / 255 - 0.485) / 0.229
    assert abs(out[0, 0, 0].item() - gray) < 1e-5
    out255, _ = make_detection_eval_transforms(size=40, max_size=45, mean=(123.675, 116.28, 103.53),
                                               std=(58.395, 57.12, 57.375))(img, target)
    torch.testing.assert_close(out255, out)


def test_resized_size_is_plain_detrs():
    # Plain-DETR's eval sizes (short side 800, long side <= 1333, long side rounded down)
    assert resized_size(480, 640, 800, 1333) == (800, 1066)
    assert resized_size(427, 640, 800, 1333) == (800, 1199)
    assert resized_size(640, 427, 800, 1333) == (1199, 800)
    assert resized_size(300, 1000, 800, 1333) == (400, 1333)
    assert resized_size(800, 1000, 800, 1333) == (800, 1000) and resized_size(50, 60, 40) == (40, 48)


def test_train_transform_moves_boxes_with_the_pixels(one_thread):
    img, target = _two_objects()
    transform = make_detection_train_transforms(scales=(48, 56, 64), max_size=100, crop_scales=(50, 60),
                                                crop_min_size=30, crop_max_size=50)
    dropped = flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = transform(img, target)
        h, w = out.shape[-2:]
        assert t["size"].tolist() == [h, w] and 48 <= min(h, w) <= 64 and t["orig_size"].tolist() == [60, 90]
        assert len(t["labels"]) == len(t["boxes"]) and (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all()
        dropped += len(t["labels"]) < 2
        for label, (cx, cy, bw, bh) in zip(t["labels"].tolist(), t["boxes"].tolist()):
            if bw * w < 4 or bh * h < 4:
                continue  # a sliver left by a crop: too thin to find in the resized pixels
            channel = out[0] if label == 0 else out[2]  # red or blue after normalisation: high in one channel
            ys, xs = torch.nonzero(channel > 1.0, as_tuple=True)
            x0, x1 = (cx - bw / 2) * w, (cx + bw / 2) * w
            y0, y1 = (cy - bh / 2) * h, (cy + bh / 2) * h
            assert abs(xs.min().item() - x0) <= 1.5 and abs(xs.max().item() + 1 - x1) <= 1.5, seed
            assert abs(ys.min().item() - y0) <= 1.5 and abs(ys.max().item() + 1 - y1) <= 1.5, seed
            flipped += label == 0 and cx > 0.5
    assert dropped > 0 and flipped > 0  # crops removed boxes, flips moved them


def test_transforms_take_images_without_boxes_and_random_size_crop_bounds():
    img, target = _two_objects()
    target = {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    for transform in (make_detection_train_transforms(scales=(32,), max_size=64), make_detection_eval_transforms(size=32)):
        out, t = transform(img, target)
        assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and out.shape[-2:] == tuple(t["size"].tolist())
    crop = RandomSizeCrop(20, 200)  # sides drawn up to the image's; an image smaller than min_size is kept whole
    for _ in range(10):
        out, _ = crop(tv_tensors.Image(img), target)
        assert 20 <= out.shape[-2] <= 60 and 20 <= out.shape[-1] <= 90
    assert RandomSizeCrop(384, 600)(tv_tensors.Image(img), target)[0].shape[-2:] == (60, 90)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        RandomSizeCrop(10, 5)


def test_collate_pads_the_batch_and_keeps_the_targets():
    ds = SyntheticBoxes("train", num_samples=2, image_size=(48, 64), transforms=make_detection_eval_transforms(size=40))
    ds2 = SyntheticBoxes("train", num_samples=2, image_size=64, transforms=make_detection_eval_transforms(size=40))
    batch = [ds[0], ds2[1]]
    images, targets = collate_fn(batch)
    assert isinstance(images, NestedTensor) and images.tensors.shape == (2, 3, 40, 53)
    assert images.mask[0, :, :53].any().item() is False and images.mask[1, :, 40:].all() and not images.mask[1, :, :40].any()
    assert targets[0] is batch[0][1] and targets[1]["size"].tolist() == [40, 40]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert images.tensors.shape == (2, 3, 40, 53) and [t["image_id"].item() for t in targets] == [1, 2]
