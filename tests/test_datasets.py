"""Datasets on tiny on-disk copies of each layout: samples, class counts, ignore handling, reduce_zero_label,
image modes, errors, dataset selection from config / official strings, loaders, the synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinoseg.data import (
    ADE20K,
    Cityscapes,
    DatasetError,
    ImageMaskFolder,
    InfiniteDataloader,
    PascalVOC,
    SyntheticShapes,
    UnpaddedDistributedSampler,
    make_data_loader,
    make_dataset,
    parse_dataset_str,
)
from dinoseg.data.io import load_image
from dinoseg.eval.segmentation.transforms import (
    make_segmentation_train_transforms,
    make_single_view_eval_transforms,
)

from ._data_layouts import CITY_EXPECTED, make_ade20k, make_cityscapes, make_folder, make_voc, write_split


# --- ADE20K ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_lists", [False, True])
def test_ade20k_layout_and_reduce_zero_label(tmp_path, with_lists):
    raw = make_ade20k(tmp_path / "ADEChallengeData2016", with_lists=with_lists)
    for split, n in (("train", 3), ("val", 2)):
        # root may be ADEChallengeData2016 itself or its parent
        ds = ADE20K(tmp_path if split == "val" else tmp_path / "ADEChallengeData2016", split)
        assert len(ds) == n and ds.num_classes == 150 and len(ds.class_names) == 150 and len(ds.palette) == 150
        assert ds.class_names[0] == "wall" and ds.class_names[149] == "flag" and ds.ignore_index == 255
        assert ds.reduce_zero_label
        for i in range(n):
            image, label = ds[i]
            ann = raw[(split, ds.sample_name(i))]
            assert image.dtype == torch.uint8 and image.shape == (3, *ann.shape)
            assert label.dtype == torch.int64 and label.shape == ann.shape
            # 0 ("other") -> ignored, k -> k - 1: 1 -> 0 (wall), 150 -> 149 (flag)
            expected = np.where(ann == 0, 255, ann - 1)
            np.testing.assert_array_equal(label.numpy(), expected)
            assert set(np.unique(label.numpy())) == {0, 1, 74, 149, 255}
            assert ds.image_path(i).endswith(f"{ds.sample_name(i)}.jpg")


def test_ade20k_split_list_official_names_and_missing_entries(tmp_path):
    root = tmp_path / "ade"
    make_ade20k(root, with_lists=True)
    # the list decides the samples: drop one, reference one that does not exist
    (root / "ADE20K_object150_train.txt").write_text("training/ADE_train_00000002.jpg\ntraining/ADE_train_00000009.jpg\n")
    with pytest.raises(DatasetError, match=r"ADE_train_00000009\.jpg: missing image \(listed in .*ADE20K_object150_train"):
        ADE20K(root, "TRAIN")
    ds = ADE20K(root, "training", strict=False)
    assert [ds.sample_name(i) for i in range(len(ds))] == ["ADE_train_00000002"]
    assert ADE20K(root, "train", use_split_file=False).__len__() == 3


def test_ade20k_reduce_zero_label_end_to_end_through_train_transforms(tmp_path):
    """Raw ADE annotation -> dataset -> train transforms -> (loss-ready) label: applied exactly once."""
    make_ade20k(tmp_path)
    tf = make_segmentation_train_transforms(img_size=24, random_img_size_ratio_range=(1.0, 1.0), crop_size=16,
                                            flip_prob=0.5, photometric=False)
    ds = make_dataset({"type": "ADE20K", "root": str(tmp_path), "split": "VAL"}, transforms=tf)
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert set(label.unique().tolist()) <= {0, 1, 74, 149, 255}  # never 150 (un-reduced) nor 254 (reduced twice)


# --- Cityscapes -----------------------------------------------------------------------------------------------
def test_cityscapes_label_ids_to_train_ids(tmp_path):
    raw = make_cityscapes(tmp_path, train_ids_for=("aachen/aachen_000001_000019",))
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 4 and ds.num_classes == 19 and len(ds.palette) == 19 and ds.class_names[18] == "bicycle"
    assert ds.sample_name(0) == "aachen/aachen_000000_000019"
    used_train_ids = [ds.mask_path(i).endswith("_labelTrainIds.png") for i in range(len(ds))]
    assert used_train_ids == [False, True, False, False]
    for i in range(len(ds)):
        _, label = ds[i]
        ids = raw[("train", ds.sample_name(i))]
        np.testing.assert_array_equal(label.numpy(), np.vectorize(CITY_EXPECTED.get)(ids))
    assert set(ds[0][1].unique().tolist()) == {0, 1, 2, 8, 10, 11, 13, 18, 255}
    assert len(Cityscapes(tmp_path, "val")) == 2
    assert not any(Cityscapes(tmp_path, "train", use_train_ids=False).mask_path(i).endswith("TrainIds.png") for i in range(4))
    with pytest.raises(DatasetError, match="labelTrainIds.png"):
        Cityscapes(tmp_path, "train", use_train_ids=True)


# --- Pascal VOC -----------------------------------------------------------------------------------------------
def test_voc_palette_masks_and_border_ignore(tmp_path):
    masks = make_voc(tmp_path)
    ds = PascalVOC(tmp_path / "VOCdevkit", "train")  # VOCdevkit or VOC2012 both work
    assert len(ds) == 3 and ds.num_classes == 21 and ds.class_names[15] == "person"
    assert ds.palette[1] == (128, 0, 0) and ds.palette[15] == (192, 128, 128)
    for i in range(len(ds)):
        image, label = ds[i]
        np.testing.assert_array_equal(label.numpy(), masks[ds.sample_name(i)])
        assert (label[:, 8] == 255).all() and image.shape == (3, 20, 28)
    assert len(PascalVOC(tmp_path / "VOCdevkit" / "VOC2012", "val")) == 2
    # the same mask re-saved as RGB colours decodes to the same indices
    path = ds.mask_path(0)
    Image.open(path).convert("RGB").save(path)
    np.testing.assert_array_equal(ds[0][1].numpy(), masks[ds.sample_name(0)])


# --- Folder ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes_file", ["json", "yaml"])
def test_folder_dataset_with_class_file(tmp_path, classes_file):
    masks = make_folder(tmp_path, classes_file=classes_file)
    ds = ImageMaskFolder(tmp_path)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.class_names == ["thing0", "thing1", "thing2"]
    assert (ds.palette is not None) == (classes_file == "json")
    for i in range(3):
        np.testing.assert_array_equal(ds[i][1].numpy(), masks[ds.sample_name(i)])


def test_folder_splits_options_and_errors(tmp_path):
    make_folder(tmp_path, stems=("a", "b", "c", "d"), classes_file=None)
    with pytest.raises(DatasetError, match="number of classes unknown"):
        ImageMaskFolder(tmp_path)
    write_split(tmp_path / "splits" / "train.txt", ["a", "c.png"])
    write_split(tmp_path / "val.txt", ["d"])
    assert [ImageMaskFolder(tmp_path, "train", num_classes=3).sample_name(i) for i in range(2)] == ["a", "c"]
    assert len(ImageMaskFolder(tmp_path, "val", num_classes=3)) == 1
    assert len(ImageMaskFolder(tmp_path, None, num_classes=3)) == 4
    with pytest.raises(DatasetError, match="empty split"):
        ImageMaskFolder(tmp_path, "test", num_classes=3)
    # ignore value other than 255, reduce_zero_label from the class file
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["x", "y"], "reduce_zero_label": True, "ignore_index": 254}))
    ds = ImageMaskFolder(tmp_path, "val")
    raw = ds.load_raw_mask(0)
    expected = np.where((raw == 0) | (raw == 254) | (raw == 255), 255, raw - 1)
    np.testing.assert_array_equal(ds[0][1].numpy(), expected)
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["x"]}))
    with pytest.raises(DatasetError, match="unknown key 'names'"):
        ImageMaskFolder(tmp_path)


def test_folder_per_split_subfolders_and_lossy_mask_hint(tmp_path):
    for split in ("train", "val"):
        make_folder(tmp_path / "tmp" / split, stems=("x", "y"), classes_file=None)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "tmp" / split / "images").rename(tmp_path / "images" / split)
        (tmp_path / "masks").mkdir(exist_ok=True)
        (tmp_path / "tmp" / split / "masks").rename(tmp_path / "masks" / split)
    ds = ImageMaskFolder(tmp_path, "val", num_classes=3)
    assert [ds.sample_name(i) for i in range(2)] == ["val/x", "val/y"]
    Image.open(tmp_path / "masks" / "val" / "y.png").convert("L").save(tmp_path / "masks" / "val" / "y.jpg")
    (tmp_path / "masks" / "val" / "y.png").unlink()
    with pytest.raises(DatasetError, match=r"missing mask: expected .*y\.png \(found val/y\.jpg, but masks must be lossless"):
        ImageMaskFolder(tmp_path, "val", num_classes=3)


# --- image modes, bad inputs at __getitem__ -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_images_of_any_mode_load_as_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = img.convert(mode)
    path = str(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
    img.save(path)
    out = load_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, 6, 7)
    if mode == "RGBA":
        np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), rgb)  # alpha dropped, colours kept
    if mode in ("L", "I;16"):
        assert (out[0] == out[1]).all() and (out[1] == out[2]).all()
    if mode == "I;16":
        np.testing.assert_array_equal(out[0].numpy(), rgb[:, :, 0])


def test_bad_samples_raise_clear_errors_at_getitem(tmp_path):
    make_folder(tmp_path, stems=("good", "small", "range", "corrupt", "colour"))
    ds = ImageMaskFolder(tmp_path)
    names = [ds.sample_name(i) for i in range(len(ds))]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "small.png")
    Image.fromarray(np.full((16, 20), 7, np.uint8)).save(tmp_path / "masks" / "range.png")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.full((16, 20, 3), (1, 2, 3), np.uint8)).save(tmp_path / "masks" / "colour.png")
    ds[names.index("good")]
    with pytest.raises(DatasetError, match=r"small\.png: image/mask size mismatch: mask is \(8, 8\)"):
        ds[names.index("small")]
    with pytest.raises(DatasetError, match=r"range\.png: label values \[7\] are outside the 3 classes"):
        ds[names.index("range")]
    with pytest.raises(DatasetError, match=r"corrupt\.png: unreadable or corrupt image"):
        ds[names.index("corrupt")]
    with pytest.raises(DatasetError, match=r"colour\.png: mask has colour \(1, 2, 3\) which is not in the palette"):
        ds[names.index("colour")]


def test_missing_mask_missing_root_and_empty_split(tmp_path):
    make_ade20k(tmp_path)
    (tmp_path / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(DatasetError, match=r"ADE_val_00000002\.jpg: missing mask: expected .*ADE_val_00000002\.png"):
        ADE20K(tmp_path, "val")
    ds = ADE20K(tmp_path, "val", strict=False)
    assert len(ds.problems) == 1 and ds.mask_path(1) is None
    with pytest.raises(FileNotFoundError, match="ADE20K root not found: .*nowhere"):
        ADE20K(tmp_path / "nowhere", "val")
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        ADE20K(tmp_path, "test")
    for f in (tmp_path / "images" / "training").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="empty split: no samples for split 'train'"):
        ADE20K(tmp_path, "train")


# --- dataset selection ----------------------------------------------------------------------------------------
def test_make_dataset_string_dict_dataclass_and_errors(tmp_path):
    from omegaconf import OmegaConf

    make_ade20k(tmp_path / "ade")
    root = str(tmp_path / "ade")
    assert parse_dataset_str(f"ADE20K:split=TRAIN:root={root}") == {"type": "ADE20K", "split": "TRAIN", "root": root}
    assert parse_dataset_str("Folder:root=C:/data:num_classes=3:reduce_zero_label=true") == {
        "type": "Folder", "root": "C:/data", "num_classes": 3, "reduce_zero_label": True}  # fmt: skip
    assert len(make_dataset(f"ADE20K:split=TRAIN:root={root}")) == 3
    assert len(make_dataset(f"ADE20K:split=VAL:root={root}")) == 2
    assert len(make_dataset("ADE20K:split=VAL", root=root)) == 2  # official: datasets.val + datasets.root
    assert len(make_dataset({"type": "ade20k", "root": root, "split": "val", "options": {"use_split_file": False}})) == 2
    assert len(make_dataset(OmegaConf.create({"type": "ADE20K", "root": root, "split": "train"}))) == 3
    syn = make_dataset({"type": "synthetic", "split": "val", "options": {"num_samples": 5, "image_size": 32}})
    assert isinstance(syn, SyntheticShapes) and len(syn) == 5 and syn.split == "val"
    with pytest.raises(DatasetError, match="unknown dataset type 'ImageNet'"):
        make_dataset(f"ImageNet:split=TRAIN:root={root}")
    with pytest.raises(DatasetError, match="unknown option 'extra' for dataset ADE20K"):
        make_dataset(f"ADE20K:split=TRAIN:root={root}:extra=x")
    with pytest.raises(DatasetError, match="token 'TRAIN' is not key=value"):
        make_dataset("ADE20K:TRAIN")
    with pytest.raises(FileNotFoundError, match="Cityscapes root not found: /no/such/dir"):
        make_dataset("Cityscapes:split=VAL:root=/no/such/dir")
    with pytest.raises(DatasetError, match="has no 'type'"):
        make_dataset({"root": root})


def test_dataset_string_values_are_read_as_the_constructor_declares(tmp_path):
    make_folder(tmp_path, stems=("a", "b"), size=(16, 16))
    # Text is read as each option's annotated type: an int, a bool, None, a pair, a list of names, a str that looks
    # like a number (a folder name).
    folder = make_dataset(f"Folder:root={tmp_path}:num_classes=3:reduce_zero_label=false:ignore_index=none:"
                          f"class_names=[sky,road,car]:mask_suffix=:image_dir=images")
    assert folder.num_classes == 3 and folder.class_names == ["sky", "road", "car"] and len(folder) == 2
    syn = make_dataset("Synthetic:split=val:num_samples=3:image_size=[40,48]:seed=7")
    assert syn.image_size == (40, 48) and syn.seed == 7 and len(syn) == 3
    assert make_dataset({"type": "Synthetic", "split": "val", "image_size": [40, 48], "num_samples": 2}).image_size == (40, 48)
    with pytest.raises(DatasetError, match=r"SyntheticShapes option num_samples='3' must be an integer"):
        make_dataset({"type": "Synthetic", "num_samples": "3"})  # a mapping's values are typed already: no reading


# The bad options a user can write, with the error each gives (dataset string -> message after "dataset '<string>': ").
BAD_OPTIONS = [
    ("Synthetic:split=TRAIN:num_samples=abc", "SyntheticShapes option num_samples='abc' must be an integer"),
    ("Synthetic:split=TRAIN:num_samples=2.5", "SyntheticShapes option num_samples='2.5' must be an integer"),
    ("Synthetic:split=TRAIN:image_size=abc",
     "SyntheticShapes option image_size='abc' must be an integer or 2 values (an integer, an integer)"),
    ("Synthetic:split=TRAIN:image_size=[64,64,64]",
     "SyntheticShapes option image_size='[64,64,64]' must be an integer or 2 values (an integer, an integer)"),
    ("Synthetic:split=TRAIN:seed=x", "SyntheticShapes option seed='x' must be an integer"),
    ("ADE20K:root=/data/ade:reduce_zero_label=maybe", "ADE20K option reduce_zero_label='maybe' must be true or false"),
    ("Synthetic:split=TRAIN:num_classes=many", "SyntheticShapes option num_classes='many' must be an integer"),
    ("Synthetic:split=TRAIN:colour=red", "unknown option 'colour' for dataset SyntheticShapes; expected one of "
                                         "['split', 'num_samples', 'image_size', 'seed', 'num_classes', 'min_shapes', "
                                         "'max_shapes', 'ignore_border', 'strict']"),
    ("SyntheticDepth:split=TRAIN:max_depth=far", "SyntheticDepth option max_depth='far' must be a number"),
    ("DepthFolder:root=/data/d:depth_scale=abc", "DepthFolder option depth_scale='abc' must be a number"),
    ("DepthFolder:root=/data/d:invalid_value=abc", "DepthFolder option invalid_value='abc' must be a number"),
    ("DepthFolder:root=/data/d:max_depth=abc", "DepthFolder option max_depth='abc' must be a number or None"),
    ("Folder:root=/data/f:num_classes=3.5", "ImageMaskFolder option num_classes='3.5' must be an integer or None"),
    ("Folder:root=/data/f:class_names=cat", "ImageMaskFolder option class_names='cat' must be a list of strings or None"),
    ("Folder:root=/data/f:reduce_zero_label=2", "ImageMaskFolder option reduce_zero_label='2' must be true or false or None"),
    ("Folder:root=/data/f:palette=[[0,0,x]]",
     "ImageMaskFolder option palette='[[0,0,x]]' must be a list of a list of integers or None"),
    ("ADE20K:split=TRAIN", "ADE20K needs a root (the dataset folder): add root=PATH to the dataset, or set datasets.root"),
    ("Cityscapes:split=TRAIN", "Cityscapes needs a root (the dataset folder): add root=PATH to the dataset, or set "
                               "datasets.root"),
    ("VOC:split=TRAIN", "PascalVOC needs a root (the dataset folder): add root=PATH to the dataset, or set datasets.root"),
    ("Folder:split=train", "ImageMaskFolder needs a root (the dataset folder): add root=PATH to the dataset, or set "
                           "datasets.root"),
    ("DepthFolder:split=TRAIN", "DepthFolder needs a root (the dataset folder): add root=PATH to the dataset, or set "
                                "datasets.root"),
    ("NYU:split=TRAIN", "NYU needs a root (the dataset folder): add root=PATH to the dataset, or set datasets.root"),
    ("KITTI:root=/data/kitti", "KITTI needs split=..."),
]


@pytest.mark.parametrize("descriptor, message", BAD_OPTIONS)
def test_every_dataset_option_is_checked_before_the_dataset_is_built(descriptor, message):
    with pytest.raises(DatasetError) as error:
        make_dataset(descriptor)
    assert str(error.value) == f"dataset {descriptor!r}: {message}"


@pytest.mark.parametrize("descriptor, message", BAD_OPTIONS)
def test_a_bad_dataset_option_is_one_line_on_the_command_line(descriptor, message, capsys):
    from dinoseg.cli import main

    config = "demo_depth.yaml" if "Depth" in descriptor or descriptor.startswith(("NYU", "KITTI")) else "demo.yaml"
    assert main(["check-data", config, f"datasets.train={descriptor}"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"dinoseg: error: dataset {descriptor!r}: {message}"]  # no traceback


@pytest.mark.parametrize("descriptor, message", [
    ("Synthetic:split=TRAIN:num_samples=0", "SyntheticShapes: num_samples=0 must be >= 1"),
    ("Synthetic:split=TRAIN:seed=-1", "SyntheticShapes: seed=-1 must be >= 0"),
    ("Synthetic:split=TRAIN:num_classes=1", "SyntheticShapes: num_classes=1 must be in 2..8"),
    ("SyntheticDepth:split=TRAIN:min_depth=3:max_depth=2", "SyntheticDepth: need 0 < min_depth < max_depth, got 3.0, 2.0"),
    ("ADE20K:split=TRAIN:root={root}:use_split_file=maybe",
     "ADE20K: use_split_file must be True, False or 'auto', got 'maybe'"),
    ("Cityscapes:split=TRAIN:root={root}:use_train_ids=maybe",
     "Cityscapes: use_train_ids must be True, False or 'auto', got 'maybe'"),
    ("DepthFolder:root={root}:depth_scale=-1", "DepthFolder: depth_scale must be a positive number (stored units per "
                                               "metre), got -1.0"),
    ("DepthFolder:root={root}:max_depth=0", "DepthFolder: max_depth must be a positive number of metres (or None), got 0.0"),
])
def test_out_of_range_dataset_options_are_one_line(descriptor, message, tmp_path, capsys):
    from dinoseg.cli import main

    config = "demo_depth.yaml" if "Depth" in descriptor else "demo.yaml"
    assert main(["check-data", config, f"datasets.train={descriptor.format(root=tmp_path)}"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"dinoseg: error: {message}"]


def test_a_newly_registered_dataset_gets_its_options_checked(monkeypatch):
    """The checks come from the constructor's signature: a dataset added to DATASETS needs no code of its own."""
    from dinoseg.data import DATASETS

    class Boxes(SyntheticShapes):
        def __init__(self, split: str = "train", transforms=None, *, min_area: float = 0.0, keep_crowd: bool = False):
            super().__init__(split, num_samples=2, transforms=transforms)
            self.min_area, self.keep_crowd = min_area, keep_crowd

    monkeypatch.setitem(DATASETS, "boxes", Boxes)
    boxes = make_dataset("Boxes:split=val:min_area=2.5:keep_crowd=yes")
    assert (boxes.min_area, boxes.keep_crowd) == (2.5, True)
    with pytest.raises(DatasetError, match=r"Boxes option min_area='big' must be a number"):
        make_dataset("Boxes:min_area=big")


def test_the_official_make_dataset_call_form(tmp_path):
    """The official `make_dataset(*, dataset_str, transform=None, target_transform=None, transforms=None)` beside the
    project's positional form; the official datasets carry the three transforms."""
    import inspect

    from .test_depth_datasets import make_nyu

    make_nyu(tmp_path)
    descriptor = f"NYU:split=VAL:root={tmp_path}"

    def joint(image, depth):
        return image.float() / 255, depth * 2

    official = make_dataset(dataset_str=descriptor, transforms=joint)
    ours = make_dataset(descriptor, transforms=joint)
    assert len(official) == len(ours) == 3 and official.transforms is joint
    assert official.transform is None and official.target_transform is None
    for (a, b), (c, d) in zip(official, ours):
        assert torch.equal(a, c) and torch.equal(b, d)
    # transform / target_transform: the image and the target, each alone (torchvision's StandardTransform).
    separate = make_dataset(dataset_str=descriptor, transform=lambda image: image.float() / 255,
                            target_transform=lambda depth: depth * 2)
    image, depth = separate[1]
    assert torch.equal(image, ours[1][0]) and torch.equal(depth, ours[1][1])
    assert separate.transform is not None and separate.target_transform is not None
    image_only = make_dataset(dataset_str=descriptor, transform=lambda image: image.float() / 255)
    assert torch.equal(image_only[0][1], make_dataset(descriptor)[0][1])
    with pytest.raises(DatasetError, match="give transforms .* or transform / target_transform, not both"):
        make_dataset(dataset_str=descriptor, transforms=joint, transform=joint)
    with pytest.raises(DatasetError, match="give one dataset description .* got both"):
        make_dataset(descriptor, dataset_str=descriptor)
    with pytest.raises(DatasetError, match="got none"):
        make_dataset()
    with pytest.warns(DeprecationWarning, match=r"pass transforms=\.\.\. by keyword"):  # the earlier positional form
        positional = make_dataset(descriptor, joint)
    assert positional.transforms is joint and torch.equal(positional[0][1], ours[0][1])
    # The official keywords in the official order and with its defaults; dinoseg's extras keyword-only after them.
    params = list(inspect.signature(make_dataset).parameters.values())
    keywords = [(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY]
    assert keywords[:4] == [("dataset_str", None), ("transform", None), ("target_transform", None), ("transforms", None)]
    assert params[0].kind is params[0].POSITIONAL_ONLY  # the project's description, never a keyword clash


# --- synthetic ------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_well_formed():
    a = SyntheticShapes("train", num_samples=4, image_size=(48, 64), seed=3)
    b = SyntheticShapes("train", num_samples=4, image_size=(48, 64), seed=3)
    for i in (0, 3, 1):
        (ia, la), (ib, lb) = a[i], b[i]
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        assert ia.dtype == torch.uint8 and ia.shape == (3, 48, 64) and la.dtype == torch.int64
        values = set(la.unique().tolist())
        assert 255 in values and 0 in values and len(values - {0, 255}) >= 1 and max(values - {255}) < 6
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticShapes("train", 4, (48, 64), seed=4)[0][0])
    assert not torch.equal(a[0][0], SyntheticShapes("val", 4, (48, 64), seed=3)[0][0])
    assert a.sample_name(2) == "train_000002" and a.image_path(0) is None
    with pytest.raises(ValueError, match="num_classes=9"):
        SyntheticShapes(num_classes=9)



def test_synthetic_labels_are_learnable_by_a_linear_probe_on_random_vit_features(one_thread):
    """Frozen random-weight ViT-S/16-like backbone (tiny), linear head on patch tokens, upsampled to pixels.
    Measured (seed 0, 64x64 images, 200 train / 50 val): patch accuracy 0.886 vs 0.591 for the majority
    class and 0.167 uniform; pixels (bilinear-upsampled logits): accuracy 0.81, mIoU 0.60 (all-background: ~0.1)."""
    from dinoseg.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=64, depth=4, num_heads=4, ffn_ratio=4, n_storage_tokens=4,
                                layerscale_init=1e-5, mask_k_bias=True, pos_embed_rope_dtype="fp32")
    vit.init_weights()
    vit.eval()
    tf = make_single_view_eval_transforms(None)

    def features(split, n):
        ds = SyntheticShapes(split, n, 64, seed=0, transforms=tf)
        x, y = (torch.stack(t) for t in zip(*(ds[i] for i in range(n))))
        with torch.no_grad():
            f = vit.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]  # B, C, 4, 4
        b, _, h, w = f.shape
        patches = y.reshape(b, h, 16, w, 16).permute(0, 1, 3, 2, 4).reshape(b, h, w, 256)
        counts = torch.nn.functional.one_hot(torch.where(patches == 255, 6, patches), 7)[..., :6].sum(3)
        keep = counts.sum(-1) > 0
        return f, y, f.permute(0, 2, 3, 1)[keep], counts.argmax(-1)[keep]

    _, _, x_tr, y_tr = features("train", 200)
    f_va, pix_va, x_va, y_va = features("val", 50)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    head = torch.nn.Linear(64, 6)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head((x_tr - mean) / std), y_tr).backward()
        opt.step()
    with torch.no_grad():
        patch_acc = (head((x_va - mean) / std).argmax(1) == y_va).float().mean().item()
        logits = head((f_va.permute(0, 2, 3, 1) - mean) / std).permute(0, 3, 1, 2)
        pred = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False).argmax(1)
    majority = (y_va == torch.bincount(y_tr).argmax()).float().mean().item()
    valid = pix_va != 255
    ious = [((pred == c) & (pix_va == c) & valid).sum() / (((pred == c) | (pix_va == c)) & valid).sum() for c in range(6)]
    miou = torch.stack(ious).mean().item()
    pixel_acc = (pred == pix_va)[valid].float().mean().item()
    print(f"linear probe: patch acc {patch_acc:.3f} (majority {majority:.3f}, uniform {1 / 6:.3f}), "
          f"pixel acc {pixel_acc:.3f}, pixel mIoU {miou:.3f}")
    assert patch_acc > majority + 0.2 and patch_acc > 0.8
    assert miou > 0.5


# --- loaders --------------------------------------------------------------------------------------------------
class _RandomDataset(torch.utils.data.Dataset):
    """Returns (index, torch + numpy random draws): the draw shows which random streams served the sample."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor(i), torch.rand(()) + torch.tensor(np.random.rand())


def _epochs(loader, n):
    out = []
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)
        idx, draws = zip(*[(i, d) for i, d in loader])
        out.append((torch.cat(idx).tolist(), torch.cat(draws)))
    return out


def test_data_loader_seeding_per_epoch_worker_and_rank():
    loader = make_data_loader(_RandomDataset(), batch_size=2, num_workers=2, shuffle=True, seed=5)
    (idx0, aug0), (idx1, aug1) = _epochs(loader, 2)
    assert sorted(idx0) == list(range(8)) and idx0 != idx1  # reshuffled by set_epoch
    assert len(set(aug0.tolist())) == 8 and not torch.allclose(aug0, aug1)  # workers and epochs differ
    (ridx0, raug0), _ = _epochs(make_data_loader(_RandomDataset(), 2, 2, True, seed=5), 2)
    assert ridx0 == idx0 and torch.equal(raug0, aug0)  # reproducible for a seed
    # as rank 1 of 2: half the samples, other augmentations
    rank1 = make_data_loader(_RandomDataset(), batch_size=2, num_workers=2, shuffle=True, seed=5, rank=1, world_size=2)
    assert isinstance(rank1.sampler, torch.utils.data.DistributedSampler) and rank1.sampler.rank == 1
    (idx_r1, aug_r1), = _epochs(rank1, 1)
    assert len(idx_r1) == 4 and not torch.allclose(aug_r1, aug0[:4])


def test_eval_sharding_sees_every_sample_once():
    ds = list(range(7))
    shards = [list(UnpaddedDistributedSampler(ds, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == ds and [len(s) for s in shards] == [3, 2, 2]
    assert [len(UnpaddedDistributedSampler(ds, num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]


def test_infinite_dataloader_sets_epoch_each_pass():
    loader = make_data_loader(_RandomDataset(), batch_size=4, num_workers=0, shuffle=True, seed=0)
    epochs = []
    original = loader.sampler.set_epoch
    loader.sampler.set_epoch = lambda e: (epochs.append(e), original(e))
    it = InfiniteDataloader(loader)
    batches = [next(it)[0].tolist() for _ in range(6)]
    assert epochs == [0, 1, 2] and len(it) == 2 and it.epoch == 2
    assert sorted(batches[0] + batches[1]) == list(range(8)) and batches[0] + batches[1] != batches[2] + batches[3]
