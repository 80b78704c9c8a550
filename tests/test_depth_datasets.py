"""Depth datasets on tiny on-disk layouts (16-bit PNGs), the synthetic scenes, and depth check-data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoseg.data import DATASETS, DatasetError, make_dataset
from dinoseg.data.adapters import DatasetWithEnumeratedTargets
from dinoseg.data.check import main as check_data_main
from dinoseg.data.datasets import KITTI, NYU, DepthFolder, SyntheticDepth
from dinoseg.data.depth_check import check_depth_dataset, format_depth_report
from dinoseg.eval.depth.transforms import make_depth_eval_transforms


def _save_rgb(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _save_depth16(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"


def _depth_mm(h, w, seed=0, low=500, high=9000) -> np.ndarray:
    values = np.random.default_rng(seed).integers(low, high, size=(h, w))
    values[:2] = 0  # missing measurements
    return values


def make_nyu(root: Path, n_test: int = 3, n_train: int = 2) -> dict:
    """NYU layout: nyu_{train,test}.txt with "/scene/rgb_X.jpg /scene/sync_depth_X.png 518.8579" lines."""
    depths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in reversed(range(n)):  # listed out of order: the dataset sorts the lines
            scene = f"{split}_scene_{i % 2}"
            _save_rgb(root / scene / f"rgb_{i:05d}.jpg", 24, 32, seed=i)
            depths[(split, i)] = _depth_mm(24, 32, seed=i)
            _save_depth16(root / scene / f"sync_depth_{i:05d}.png", depths[(split, i)])
            lines.append(f"/{scene}/rgb_{i:05d}.jpg /{scene}/sync_depth_{i:05d}.png 518.8579\n")
        (root / f"nyu_{split}.txt").write_text("".join(lines))
    return depths


# --- NYU ----------------------------------------------------------------------------------------------------------
def test_nyu_layout_and_values(tmp_path):
    depths = make_nyu(tmp_path)
    val = make_dataset(f"NYU:split=VAL:root={tmp_path}")
    assert isinstance(val, NYU) and len(val) == 3 and val.depth_scale == 1000 and val.eval_mask == "NYU_EIGEN"
    assert [val.sample_name(i) for i in range(3)] == ["test_scene_0/rgb_00000", "test_scene_0/rgb_00002",
                                                      "test_scene_1/rgb_00001"]  # sorted lines, as the official
    image, depth = val[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 32)
    assert depth.dtype == torch.float32 and depth.shape == (1, 24, 32)
    assert torch.equal(depth[0], torch.from_numpy(depths[("test", 2)]).float())  # millimetres, exactly
    assert val.samples[0].focal == pytest.approx(518.8579)
    assert len(make_dataset(f"NYU:split=TRAIN:root={tmp_path}")) == 2
    assert len(NYU(split="test", root=str(tmp_path))) == 3
    metres = make_dataset(f"NYU:split=VAL:root={tmp_path}", transforms=make_depth_eval_transforms(normalization_constant=1000))
    torch.testing.assert_close(metres[1][1][0][0], torch.from_numpy(depths[("test", 2)]).float() / 1000)


def test_nyu_missing_files_and_bad_lines_are_named(tmp_path):
    make_nyu(tmp_path)
    (tmp_path / "test_scene_1" / "sync_depth_00001.png").unlink()
    with pytest.raises(DatasetError, match=r"NYU: .*sync_depth_00001.png: missing depth map \(listed in .*nyu_test.txt:2\)"):
        NYU(split="val", root=str(tmp_path))
    lenient = NYU(split="val", root=str(tmp_path), strict=False)
    assert len(lenient) == 3 and len(lenient.problems) == 1 and lenient.depth_path(2) is None
    (tmp_path / "nyu_test.txt").write_text("only_one_field.jpg\n")
    with pytest.raises(DatasetError, match=r"nyu_test.txt:1: malformed line 'only_one_field.jpg'"):
        NYU(split="val", root=str(tmp_path))
    with pytest.raises(DatasetError, match="NYU: root folder not found"):
        NYU(split="val", root=str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="NYU: unknown split 'dev'"):
        NYU(split="dev", root=str(tmp_path))


# --- KITTI --------------------------------------------------------------------------------------------------------
def test_kitti_eigen_layout(tmp_path):
    drive = "2011_09_26_drive_0002_sync"
    lines, stored = [], {}
    for i in range(3):
        image = f"2011_09_26/{drive}/image_02/data/{i:010d}.png"
        depth = f"{drive}/proj_depth/groundtruth/image_02/{i:010d}.png"
        _save_rgb(tmp_path / "input" / image, 20, 40, seed=i)
        stored[i] = _depth_mm(20, 40, seed=i, low=256, high=80 * 256)
        _save_depth16(tmp_path / "gt_depth" / depth, stored[i])
        lines.append(f"{image} {depth} 721.5377")
    lines.append(f"2011_09_26/{drive}/image_02/data/{9:010d}.png None 721.5377")  # Eigen test frame without depth
    (tmp_path / "kitti_eigen_test.txt").write_text("\n".join(lines) + "\n")
    dataset = make_dataset(f"KITTI:split=TEST:root={tmp_path}", transforms=make_depth_eval_transforms(normalization_constant=256))
    assert isinstance(dataset, KITTI) and len(dataset) == 3 and dataset.num_without_depth == 1
    assert dataset.eval_mask == "KITTI_GARG" and dataset.depth_scale == 256 and dataset.max_depth == 80
    _, depths = dataset[2]
    torch.testing.assert_close(depths[0][0], torch.from_numpy(stored[2]).float() / 256)  # metres
    with pytest.raises(DatasetError, match=r"KITTI: split file not found: .*kitti_eigen_train.txt"):
        KITTI(split="train", root=str(tmp_path))


# --- DepthFolder ----------------------------------------------------------------------------------------------------
def test_depth_folder_units_and_invalid_values(tmp_path):
    _save_rgb(tmp_path / "images" / "a.jpg", 8, 10)
    stored = np.full((8, 10), 1234)
    stored[0, 0] = 65535  # the camera's "no depth" value
    _save_depth16(tmp_path / "depths" / "a.png", stored)
    _save_rgb(tmp_path / "images" / "b.png", 8, 10, seed=1)
    metres = np.full((8, 10), 2.5, dtype=np.float32)
    metres[1, 1], metres[2, 2] = np.nan, -1.0
    np.save(tmp_path / "depths" / "b.npy", metres)
    (tmp_path / "val.txt").write_text("a\nb\n")
    mm = DepthFolder(str(tmp_path), "val", invalid_value=65535)
    assert mm.depth_scale == 1000 and len(mm) == 2
    depth = mm[0][1]
    assert depth[0, 0, 0] == 0 and depth[0, 1, 1] == 1234
    via_string = make_dataset(f"DepthFolder:root={tmp_path}:split=val:depth_scale=1:invalid_value=65535")
    b = via_string[1][1][0]
    assert via_string.depth_scale == 1 and b[1, 1] == 0 and b[2, 2] == 0 and b[0, 0] == 2.5  # NaN, negative: missing
    (tmp_path / "depths" / "b.npy").unlink()
    with pytest.raises(DatasetError, match=r"b.png: missing depth map: expected .*depths/b.png \(or .tif/.tiff/.npy\)"):
        DepthFolder(str(tmp_path), "val")
    with pytest.raises(DatasetError, match="depth_scale must be a positive number"):
        DepthFolder(str(tmp_path), depth_scale=0)


def test_float_tiff_depth(tmp_path):
    _save_rgb(tmp_path / "images" / "x.png", 6, 7)
    (tmp_path / "depths").mkdir()
    values = np.linspace(0.5, 3.0, 42, dtype=np.float32).reshape(6, 7)
    Image.fromarray(values, mode="F").save(tmp_path / "depths" / "x.tif")
    depth = DepthFolder(str(tmp_path), depth_scale=1.0)[0][1]
    torch.testing.assert_close(depth[0], torch.from_numpy(values))


def test_depth_datasets_are_registered():
    assert {"nyu", "kitti", "depthfolder", "syntheticdepth"} <= set(DATASETS)


def test_enumerated_targets_pad_for_sharding():
    base = SyntheticDepth("val", 3, 16)
    padded = DatasetWithEnumeratedTargets(base, pad_dataset=True, num_replicas=2)
    assert len(padded) == 4
    assert [padded[i][1][0] for i in range(4)] == [0, 1, 2, -1]
    assert torch.equal(padded[3][0], base[0][0])
    with pytest.raises(ValueError, match="needs num_replicas"):
        DatasetWithEnumeratedTargets(base, pad_dataset=True)


# --- synthetic ------------------------------------------------------------------------------------------------------
def test_synthetic_depth_is_deterministic_and_well_formed():
    a = SyntheticDepth("train", 6, (48, 64), seed=3)
    b = SyntheticDepth("train", 6, (48, 64), seed=3)
    for i in (0, 5, 2):
        (ia, da), (ib, db) = a[i], b[i]
        assert torch.equal(ia, ib) and torch.equal(da, db)
        assert ia.dtype == torch.uint8 and ia.shape == (3, 48, 64) and da.shape == (1, 48, 64)
        valid = da[da > 0] / 1000
        assert valid.numel() > 0 and valid.min() >= 0.5 and valid.max() <= 10.0
    assert not torch.equal(a[0][0], a[1][0]) and not torch.equal(a[0][0], SyntheticDepth("val", 6, (48, 64), seed=3)[0][0])
    assert a.sample_name(2) == "train_000002" and a.image_path(0) is None and a.depth_scale == 1000
    holes = [(SyntheticDepth("train", 12, 32)[i][1] == 0).float().mean().item() for i in range(12)]
    assert 0 < sum(h > 0 for h in holes) < 12  # some scenes have sky (no depth), some a back wall
    with pytest.raises(ValueError, match="min_depth < max_depth"):
        SyntheticDepth(min_depth=5, max_depth=2)


def test_synthetic_floor_depth_follows_the_ground_plane():
    image, depth = SyntheticDepth("train", 1, (64, 64), seed=0, max_objects=0)[0]
    column = depth[0, :, 32] / 1000
    floor = column[(column > 0) & (torch.arange(64) > 40)]
    assert (floor[1:] <= floor[:-1]).all() and floor[0] > floor[-1]  # nearer towards the bottom



def test_synthetic_depth_is_learnable_by_a_linear_probe_on_random_vit_features(one_thread):
    """Ridge regression from the patch tokens of a frozen random-weight ViT (layer scale 1e-5, so its features are
    about a normalised random projection of the patch) to the mean depth of the patch. Measured (seed 0, 64 x 64,
    200 train / 50 val images, about 2800 patches): RMSE 1.28 m vs 2.67 m for the mean depth, AbsRel 0.34 vs 0.90.
    A trained linear depther head (256 train images of 96 x 96, 400 steps, SigLoss, 64 bins) reaches per-image RMSE
    0.82 m, AbsRel 0.16, a1 0.79 where predicting the mean depth gives 2.70 m, 1.00 and 0.10."""
    from dinoseg.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=64, depth=4, num_heads=4, ffn_ratio=4, n_storage_tokens=4,
                                layerscale_init=1e-5, mask_k_bias=True, pos_embed_rope_dtype="fp32")
    vit.init_weights()
    vit.eval()
    transform = make_depth_eval_transforms(normalization_constant=1000)

    def patches(split, n):
        ds = SyntheticDepth(split, n, 64, seed=0, transforms=transform)
        images, depths = zip(*(ds[i] for i in range(n)))
        x, d = torch.stack([v[0] for v in images]), torch.stack([v[0] for v in depths])
        with torch.no_grad():
            f = vit.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
        b, _, h, w = f.shape
        p = d.reshape(b, h, 16, w, 16).permute(0, 1, 3, 2, 4).reshape(b, h, w, 256)
        count = (p > 0).sum(-1)
        keep = count > 128
        return f.permute(0, 2, 3, 1)[keep], (p.sum(-1) / count.clamp_min(1))[keep]

    x_tr, y_tr = patches("train", 200)
    x_va, y_va = patches("val", 50)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6

    def design(x):
        return torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1)

    a = design(x_tr)
    weights = torch.linalg.solve(a.T @ a + 0.1 * torch.eye(a.shape[1]), a.T @ y_tr)
    pred = design(x_va) @ weights
    rmse = ((pred - y_va) ** 2).mean().sqrt().item()
    baseline = ((y_tr.mean() - y_va) ** 2).mean().sqrt().item()
    print(f"linear probe: RMSE {rmse:.3f} m vs {baseline:.3f} m for the mean depth")
    assert rmse < 0.6 * baseline


# --- check-data -----------------------------------------------------------------------------------------------------
def test_check_depth_dataset_reports_each_fault_by_file(tmp_path):
    make_nyu(tmp_path, n_test=7)
    scene = tmp_path / "test_scene_0"
    (scene / "rgb_00000.jpg").write_bytes(b"not an image")  # unreadable
    _save_depth16(scene / "sync_depth_00002.png", _depth_mm(20, 32))  # size mismatch
    _save_depth16(tmp_path / "test_scene_0" / "sync_depth_00004.png", np.zeros((24, 32)))  # no valid pixel
    _save_depth16(tmp_path / "test_scene_1" / "sync_depth_00001.png", np.full((24, 32), 3))  # metres in a mm dataset
    Image.fromarray(np.full((24, 32), 200, dtype=np.uint8)).save(tmp_path / "test_scene_1" / "sync_depth_00003.png")
    sparse = _depth_mm(24, 32)
    sparse[:23] = 0
    _save_depth16(tmp_path / "test_scene_1" / "sync_depth_00005.png", sparse)
    _save_depth16(tmp_path / "test_scene_0" / "sync_depth_00006.png", np.full((24, 32), 40000))  # 40 m indoors
    report = check_depth_dataset(make_dataset(f"NYU:split=VAL:root={tmp_path}", strict=False))
    problems = {Path(p.path).name: p.fault for p in report.problems}
    warnings = [(Path(p.path).name, p.fault) for p in report.warnings]
    assert not report.ok and len(report.problems) == 5 and report.num_usable == 2
    assert "unreadable or corrupt image" in problems["rgb_00000.jpg"]
    assert "image/depth size mismatch: depth is (20, 32)" in problems["sync_depth_00002.png"]
    assert ("sync_depth_00004.png", "no valid depth pixel: this sample scores NaN and is left out of the metrics") in warnings
    # Depth units that look wrong are problems: they would train and score depths off by a factor.
    assert "depth units look wrong: median valid depth 0.003 m with depth_scale=1000" in problems["sync_depth_00001.png"]
    assert ("depth units look wrong: an 8-bit depth map with depth_scale=1000 stored units per metre holds no depth "
            "beyond 0.255 m (median 0.2 m") in problems["sync_depth_00003.png"]
    assert "median valid depth 40 m (this dataset's depths stop at 10 m)" in problems["sync_depth_00006.png"]
    assert ("sync_depth_00005.png", "95.8% of the pixels have no depth") in warnings
    # As warnings when asked (datasets.check_units=false); the samples then count in the statistics.
    lenient = check_depth_dataset(make_dataset(f"NYU:split=VAL:root={tmp_path}", strict=False), units_are_problems=False)
    assert len(lenient.problems) == 2 and lenient.num_usable == 5
    assert {"sync_depth_00001.png", "sync_depth_00003.png", "sync_depth_00006.png"} <= {
        Path(p.path).name for p in lenient.warnings if "depth units look wrong" in p.fault}
    text = format_depth_report(report)
    assert "5 problem(s):" in text and "per-image median" in text and "of the pixels have no depth" in text


def test_depth_units_fault_rules():
    from dinoseg.data.depth_check import depth_units_fault

    assert depth_units_fault(np.full(9, 2.5), 1000) is None
    assert "median valid depth 0.002 m" in depth_units_fault(np.full(9, 0.002), 1000)  # metres read as millimetres
    assert "median valid depth 2500 m" in depth_units_fault(np.full(9, 2500.0), 1)  # millimetres read as metres
    assert "depths stop at 10 m" in depth_units_fault(np.full(9, 40.0), 1000, max_depth=10.0)
    # An 8-bit map is only wrong when its scale leaves it no room for a scene: decimetres (10 per metre) hold 25.5 m.
    assert "holds no depth beyond 0.255 m" in depth_units_fault(np.full(9, 0.1), 1000, bit_depth=8)
    assert depth_units_fault(np.full(9, 10.0), 10, bit_depth=8) is None


def test_check_data_command_dispatches_depth_datasets(tmp_path, capsys):
    make_nyu(tmp_path)
    assert check_data_main([f"NYU:split=VAL:root={tmp_path}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "No problems found." in out and "depth_scale 1000 per metre" in out
    (tmp_path / "test_scene_0" / "sync_depth_00000.png").write_bytes(b"broken")
    assert check_data_main([f"NYU:split=VAL:root={tmp_path}", "--no-progress"]) == 1
    assert "unreadable or corrupt depth map" in capsys.readouterr().out
