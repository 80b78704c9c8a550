"""The depth evaluation loop: parity with the official loop on an NYU folder read through make_dataset, TTA,
padding, all-invalid images, saved results."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dinoseg.data import make_dataset
from dinoseg.data.adapters import DatasetWithEnumeratedTargets
from dinoseg.eval.depth.config import ResultConfig, ResultExtension
from dinoseg.eval.depth.eval import evaluate_depther_with_dataloader
from dinoseg.eval.depth.metrics import DEPTH_METRICS
from dinoseg.eval.depth.transforms import make_depth_eval_transforms

from ._depth_fixtures import TOL, depth_index, load_depth_fixture, official_depther, write_nyu_layout

EVAL_FIXTURES = ["eval_linear_nyu.pt", "eval_dpt_cls_log_sigmoid.pt"]


def _loader(root: Path, meta: dict, tta: bool, pad_to: int | None = None) -> DataLoader:
    transform = make_depth_eval_transforms(normalization_constant=meta["transforms"]["normalization_constant"],
                                           img_size=meta["transforms"]["img_size"],
                                           fixed_crop=meta["transforms"]["fixed_crop"], tta=tta)
    dataset = make_dataset(f"NYU:split=VAL:root={root}", transforms=transform)
    wrapped = DatasetWithEnumeratedTargets(dataset, pad_dataset=pad_to is not None, num_replicas=pad_to)
    return DataLoader(wrapped, batch_size=1)


def _run(loader, depther, setting: dict, **kwargs):
    return evaluate_depther_with_dataloader(
        loader, depther, "cpu", DEPTH_METRICS, tuple(setting["eval_range"]), ResultConfig(save_results=False),
        ignored_value=0.0, eval_mask_type=setting["eval_mask_type"], align_least_squares=setting["align_least_squares"],
        use_tta=setting["use_tta"], **kwargs)


@pytest.mark.parametrize("name", EVAL_FIXTURES)
def test_eval_loop_matches_official(tmp_path, name):
    meta, data = depth_index()[name], load_depth_fixture(name)
    write_nyu_layout(tmp_path, meta, data)
    depther, _ = official_depther(meta["depther"])
    for setting_name, setting in meta["settings"].items():
        loader = _loader(tmp_path, meta, setting["use_tta"])
        # what the loader yields: NYU's sorted lines, 16-bit PNGs in mm -> metres, eval transforms
        for batch, expected in zip(loader, data["batches"]["tta" if setting["use_tta"] else "no_tta"], strict=True):
            images, (index, gt) = batch
            assert torch.equal(index, expected["index"])
            for ours, ref in zip(images + gt, expected["images"] + expected["gt"], strict=True):
                torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
        reference = data["results"][setting_name]
        per_sample, losses, indices = _run(loader, depther, setting, reduce_results=False)
        reduced, _, _ = _run(loader, depther, setting, reduce_results=True)
        assert losses == {} and torch.equal(indices, reference["indices"])
        assert set(per_sample) == set(reference["per_sample"]) == {m.name for m in DEPTH_METRICS}
        for metric, values in reference["per_sample"].items():
            torch.testing.assert_close(torch.tensor(per_sample[metric]), values, **TOL)
            assert isinstance(reduced[metric], float)
            torch.testing.assert_close(torch.tensor(reduced[metric]), reference["reduced"][metric], **TOL)


@pytest.fixture
def nyu_setup(tmp_path):
    meta, data = depth_index()["eval_linear_nyu.pt"], load_depth_fixture("eval_linear_nyu.pt")
    write_nyu_layout(tmp_path, meta, data)
    depther, _ = official_depther(meta["depther"])
    return tmp_path, meta, depther


def test_tta_flip_is_made_when_the_loader_gives_one_view(nyu_setup):
    root, meta, depther = nyu_setup
    setting = meta["settings"]["nyu_tta"]
    two_views, _, _ = _run(_loader(root, meta, tta=True), depther, setting)
    one_view, _, _ = _run(_loader(root, meta, tta=False), depther, setting)
    assert one_view == pytest.approx(two_views, rel=1e-6)


def test_padding_entries_of_a_sharded_loader_are_not_scored(nyu_setup):
    root, meta, depther = nyu_setup
    setting = meta["settings"]["full_no_tta"]
    plain, _, indices = _run(_loader(root, meta, tta=False), depther, setting, reduce_results=False)
    padded_loader = _loader(root, meta, tta=False, pad_to=4)  # 3 samples padded to 4: the 4th has index -1
    assert len(padded_loader) == 4
    padded, _, padded_indices = _run(padded_loader, depther, setting, reduce_results=False)
    assert padded_indices.tolist() == indices.tolist() == [0, 1, 2] and padded == plain


def test_an_image_without_valid_depth_is_left_out_of_the_mean_with_a_warning(nyu_setup):
    """Official: such an image scores silog 0 (NaN elsewhere) and drags the silog mean down."""
    root, meta, depther = nyu_setup
    setting = meta["settings"]["full_no_tta"]
    before, _, _ = _run(_loader(root, meta, tta=False), depther, setting, reduce_results=False)
    from PIL import Image

    lines = sorted(meta["nyu_test_txt"])
    depth_file = root / lines[1].split()[1].strip("/")  # dataset index 1
    Image.fromarray(np.zeros((60, 80), dtype=np.uint16)).save(depth_file)
    with pytest.warns(RuntimeWarning, match=r"1 of 3 image\(s\) have no valid ground-truth pixel .*\(indices \[1\]\)"):
        per_sample, _, _ = _run(_loader(root, meta, tta=False), depther, setting, reduce_results=False)
    with pytest.warns(RuntimeWarning):
        reduced, _, _ = _run(_loader(root, meta, tta=False), depther, setting)
    for metric, values in per_sample.items():
        assert math.isnan(values[1])
        assert reduced[metric] == pytest.approx((before[metric][0] + before[metric][2]) / 2, rel=1e-5)


def test_saved_results(nyu_setup, tmp_path):
    root, meta, depther = nyu_setup
    setting = meta["settings"]["nyu_tta"]
    loader = _loader(root, meta, tta=True)
    for extension, names in ((ResultExtension.PNG, ["results_0.png", "image_0.png", "pred_0.png", "gt_0.png"]),
                             (ResultExtension.PTH, ["results_0.pth"])):
        out = tmp_path / extension.value
        config = ResultConfig(save_results=True, extension=extension, save_separate_files=True)
        evaluate_depther_with_dataloader(loader, depther, torch.device("cpu"), ["rmse"], (0.001, 10.0), config,
                                         save_dir=str(out), use_tta=True, eval_mask_type=setting["eval_mask_type"])
        saved = sorted(p.name for p in (out / "visualizations").iterdir())
        assert set(names) <= set(saved) and len(saved) == 3 * len(names)
    from PIL import Image

    band = Image.open(tmp_path / "png" / "visualizations" / "results_0.png")
    assert band.size == (160, 60)  # prediction and ground truth side by side, at the ground-truth size
    raw = torch.load(tmp_path / "pth" / "visualizations" / "results_0.pth", weights_only=True)
    assert raw["pred"].shape == raw["target"].shape == (1, 1, 60, 80) and raw["image"].shape == (3, 60, 80)


def test_evaluate_with_config_runs_the_configured_protocol(nyu_setup):
    from dinoseg.eval.depth.config import DepthConfig
    from dinoseg.eval.depth.eval import evaluate_depther_with_config

    root, meta, depther = nyu_setup
    config = DepthConfig(metrics=[m.name for m in DEPTH_METRICS])
    config.train.num_workers = 0
    config.datasets.root, config.datasets.test = str(root), "NYU:split=VAL"
    config.transforms.eval.eval_mask = "NYU_EIGEN"
    config.eval.align_least_squares = True  # the synthmix inference protocol: Eigen crop, flip TTA, lsq, 0.001-10 m
    results, _, indices = evaluate_depther_with_config(config, depther, "cpu")
    reference = load_depth_fixture("eval_linear_nyu.pt")["results"]["nyu_tta_lsq"]["reduced"]
    assert indices.tolist() == [0, 1, 2]
    for metric, value in reference.items():
        torch.testing.assert_close(torch.tensor(results[metric]), value, **TOL)


def test_colorized_depth_uses_a_current_matplotlib_colormap():
    """Official save_results calls matplotlib.cm.get_cmap, removed in matplotlib 3.9."""
    from dinoseg.eval.depth.visualization_utils import depth_tensor_to_colorized_pil

    depth = torch.linspace(1, 5, 12).reshape(1, 3, 4)
    depth[0, 0, 0] = 0  # missing
    image = np.asarray(depth_tensor_to_colorized_pil(depth, cmap="plasma"))
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    assert (image[0, 0] == 0).all()  # no depth: black
    assert not np.array_equal(image[0, 1], image[2, 3])
    ranged = np.asarray(depth_tensor_to_colorized_pil(depth, vmin=1, vmax=5))
    assert np.array_equal(np.asarray(depth_tensor_to_colorized_pil(depth * 2, vmin=2, vmax=10)), ranged)
