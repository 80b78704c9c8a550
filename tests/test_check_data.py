"""check-data: every bad input is reported with its file and fault, all in one pass, without crashing;
the per-class histogram counts the good pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dinoseg.data import ADE20K, SyntheticShapes, make_dataset
from dinoseg.data.check import check_dataset, format_report, main

from ._data_layouts import make_ade20k, make_folder


@pytest.fixture
def broken_folder(tmp_path):
    stems = ("good1", "good2", "mismatch", "corrupt_img", "truncated_img", "corrupt_mask", "out_of_range", "no_mask")
    masks = make_folder(tmp_path, stems=stems, num_classes=3)
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "masks" / "mismatch.png")
    (tmp_path / "images" / "corrupt_img.png").write_bytes(b"this is not an image")
    data = (tmp_path / "images" / "truncated_img.png").read_bytes()
    (tmp_path / "images" / "truncated_img.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "masks" / "corrupt_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    bad = masks["out_of_range"].copy()
    bad[2:4, 2:5] = 9
    Image.fromarray(bad.astype(np.uint8)).save(tmp_path / "masks" / "out_of_range.png")
    (tmp_path / "masks" / "no_mask.png").unlink()
    return tmp_path, masks


def test_check_reports_every_problem_by_file(broken_folder, capsys):
    root, masks = broken_folder
    code = main([f"Folder:root={root}", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    lines = [line.strip() for line in out.splitlines()]
    expected = {
        "mismatch.png": "image/mask size mismatch: mask is (8, 9) (H, W) but image",
        "corrupt_img.png": "unreadable or corrupt image",
        "truncated_img.png": "unreadable or corrupt image",
        "corrupt_mask.png": "unreadable or corrupt mask",
        "out_of_range.png": "label values [9] are outside the 3 classes 0..2 and are not the ignore index 255: 6 pixels",
        "no_mask.png": "missing mask: expected",
    }
    for name, fault in expected.items():
        hits = [line for line in lines if name in line.split(": ")[0] or (name == "no_mask.png" and "no_mask" in line)]
        assert any(fault in line for line in hits), (name, hits)
    assert "6 problem(s):" in out
    # histogram: only the samples without problems (good1, good2) are counted
    report = check_dataset(make_dataset(f"Folder:root={root}", strict=False))
    assert len(report.problems) == 6 and not report.ok and report.num_usable == 2
    good = np.concatenate([masks["good1"].ravel(), masks["good2"].ravel()])
    np.testing.assert_array_equal(report.class_pixels, np.bincount(good[good != 255], minlength=3))
    assert report.ignore_pixels == 2  # one ignore pixel per mask
    np.testing.assert_array_equal(report.class_images, [2, 2, 2])
    assert "Per-class pixel histogram" in out and "thing2" in out


def test_check_reports_raw_file_values_and_empty_split(tmp_path, capsys):
    make_ade20k(tmp_path)
    path = tmp_path / "annotations" / "validation" / "ADE_val_00000001.png"
    ann = np.array(Image.open(path))
    ann[0, :3] = 151  # one past the last ADE class
    Image.fromarray(ann).save(path)
    report = check_dataset(ADE20K(tmp_path, "val"))
    assert len(report.problems) == 1 and report.problems[0].path == str(path)
    assert "label values [150]" in report.problems[0].fault and "values in the file: [151]" in report.problems[0].fault
    assert "reduce_zero_label" in report.problems[0].fault
    for f in (tmp_path / "images" / "training").iterdir():
        f.unlink()
    assert main([f"ADE20K:split=TRAIN:root={tmp_path}", "--no-progress"]) == 1
    assert "empty split" in capsys.readouterr().out


def test_check_clean_synthetic_histogram_and_cli_errors(capsys):
    ds = SyntheticShapes("val", num_samples=6, image_size=32, seed=1)
    report = check_dataset(ds)
    assert report.ok and report.num_checked == 6
    labels = np.stack([ds[i][1].numpy() for i in range(6)])
    np.testing.assert_array_equal(report.class_pixels, np.bincount(labels[labels != 255], minlength=6))
    assert report.ignore_pixels == int((labels == 255).sum()) > 0
    text = format_report(report)
    assert "No problems found." in text and "background" in text
    assert main(["Synthetic:split=val:num_samples=4:image_size=32", "--no-progress"]) == 0
    assert main(["NoSuchSet:split=val", "--no-progress"]) == 2
    assert "unknown dataset type 'NoSuchSet'" in capsys.readouterr().err


def test_check_data_command_on_a_shipped_recipe(tmp_path, capsys):
    # The ADE20K recipe needs weights to train, not to check its data: only datasets.* must be given.
    from dinoseg.cli import main

    from ._data_layouts import make_ade20k

    make_ade20k(tmp_path)
    assert main(["check-data", "ade20k_linear.yaml", f"datasets.root={tmp_path}", "--split", "val"]) == 0
    assert "Per-class pixel histogram" in capsys.readouterr().out
    assert main(["check-data", "ade20k_linear.yaml", "--split", "val"]) == 2
    assert "datasets.root: required value missing" in capsys.readouterr().err
