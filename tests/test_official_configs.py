"""Configs of the official DINOv3 code, read unchanged by `dinoseg train / eval / check-data`: recognised, translated
key by key (logged once), refused with one line where dinoseg cannot honour a value. The tests write the official
files' keys and values themselves (no copy of the files is shipped); when the official repository's mirror is on this
machine, they check that these are the files' contents."""

import logging

import pytest
import yaml
from omegaconf import OmegaConf

from dinoseg.cli import load, main
from dinoseg.engine.config import ConfigError, read_layers
from dinoseg.engine.official_config import OfficialSchema, translate_layers

from ._data_layouts import make_ade20k
from ._official_yaml import LINEAR, M2F, NYU, needs_mirror, official_file
from .engine_utils import TINY


@pytest.fixture
def official(tmp_path):
    def write(text: str, name: str) -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return {"linear": write(LINEAR, "config-ade20k-linear-training.yaml"),
            "m2f": write(M2F, "config-ade20k-m2f-inference.yaml")}


@needs_mirror
@pytest.mark.parametrize(("name", "text"), [("config-ade20k-linear-training.yaml", LINEAR),
                                            ("config-ade20k-m2f-inference.yaml", M2F)])
def test_these_are_the_official_files(name, text):
    content = official_file(f"dinov3/eval/segmentation/configs/{name}")
    assert OmegaConf.to_container(OmegaConf.create(content)) == OmegaConf.to_container(OmegaConf.create(text))


def test_official_linear_training_config(official, caplog):
    with caplog.at_level(logging.INFO, logger="dinoseg"):
        _, cfg = load([official["linear"], "model.dino_hub=dinov3_vitl16", "datasets.root=/data/ade"], "train")
    assert cfg.train.batch_size == 16 and cfg.train.num_workers == 6 and cfg.seed == 100
    assert cfg.precision.value == "float32"
    assert dict(cfg.optimizer) == {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-3,
                                   "gradient_clip": float("inf")}
    s = cfg.scheduler
    assert (s.type.value, s.total_iter, s.warmup_iters, s.warmup_ratio, s.final_div_factor, s.div_factor) == (
        "WarmupOneCycleLR", 40000, 1500, 1e-6, float("inf"), 25.0)
    assert s.anneal_strategy.value == "cos" and s.use_beta1 is False
    assert cfg.model.dino_hub == "dinov3_vitl16" and cfg.model.pretrained_weights == "LVD1689M"
    assert cfg.model.random_init is False  # the released weights from the hub cache; an error if they are not there
    _, random = load([official["linear"], "model.dino_hub=dinov3_vitl16", "model.random_init=true",
                      "datasets.root=/data/ade"], "train")
    assert random.model.random_init is True and random.model.pretrained_weights is None  # asked for: no implicit weights
    d = cfg.decoder_head
    assert (d.type.value, d.backbone_out_layers.value, d.num_classes, d.dropout, d.use_batchnorm, d.use_cls_token) == (
        "linear", "LAST", 150, 0.1, True, False)
    t = cfg.transforms.train
    assert (t.img_size, list(t.random_img_size_ratio_range), t.crop_size, t.flip_prob, t.photometric_distortion,
            list(t.hue_range), t.cat_max_ratio) == (512, [0.5, 2.0], 512, 0.5, True, [-0.5, 0.5], 0.75)
    assert cfg.transforms.eval.img_size == 512 and list(cfg.transforms.eval.tta_ratios) == [1.0]
    assert list(cfg.transforms.mean) == pytest.approx([0.485, 0.456, 0.406])
    e = cfg.eval
    assert (e.mode.value, e.crop_size, e.stride, e.eval_interval, e.use_tta, e.metric_to_save) == (
        "slide", 512, 341, 5000, False, "mIoU")
    assert (cfg.train.diceloss_weight, cfg.train.celoss_weight) == (0.0, 1.0)
    assert cfg.datasets.train == "ADE20K:split=TRAIN" and cfg.datasets.root == "/data/ade"
    # The translation is logged once, as one block naming every key.
    records = [r.getMessage() for r in caplog.records if "official DINOv3" in r.getMessage()]
    assert len(records) == 1
    assert "bs x n_gpus -> train.batch_size=16" in records[0] and "optimizer.gradient_clip=inf: no clipping" in records[0]


def test_shipped_linear_recipe_is_the_official_one(official):
    """`ade20k_linear.yaml` claims the official recipe: every value the official file sets, or defaults, agrees."""
    common = ["model.dino_hub=dinov3_vitl16", "model.pretrained_weights=/w.pth", "datasets.root=/data"]
    _, theirs = load([official["linear"], *common], "train")
    _, ours = load(["ade20k_linear.yaml", *common], "train")
    for section in ("optimizer", "scheduler", "transforms", "decoder_head"):
        assert OmegaConf.to_container(ours[section]) == OmegaConf.to_container(theirs[section]), section
    for key in ("batch_size", "num_workers", "diceloss_weight", "celoss_weight"):
        assert ours.train[key] == theirs.train[key], key
    for key in ("mode", "crop_size", "stride", "eval_interval", "use_tta", "metric_to_save"):
        assert ours.eval[key] == theirs.eval[key], key
    assert (ours.seed, ours.precision, ours.datasets.train, ours.datasets.val) == (
        theirs.seed, theirs.precision, theirs.datasets.train, theirs.datasets.val)


def test_official_m2f_inference_config(official):
    _, cfg = load([official["m2f"], "load_from=dinov3_vit7b16_ms", "datasets.root=/data/ade"], "eval")
    assert cfg.head == "dinov3_vit7b16_ms"
    assert cfg.model.dino_hub == "dinov3_vit7b16" and cfg.model.pretrained_weights == "LVD1689M"
    d = cfg.decoder_head
    assert (d.type.value, d.backbone_out_layers.value, d.num_classes, d.hidden_dim) == (
        "m2f", "FOUR_EVEN_INTERVALS", 150, 2048)
    assert d.m2f.adapter.backbone_dtype == "bfloat16" and cfg.precision.value == "float32"
    assert cfg.transforms.eval.img_size == 896 and list(cfg.transforms.eval.tta_ratios) == [0.9, 0.95, 1.0, 1.05, 1.1]
    assert (cfg.eval.mode.value, cfg.eval.crop_size, cfg.eval.stride, cfg.eval.use_tta) == ("slide", 896, 596, True)
    # A head checkpoint of one's own: the backbone must be named (the official code needs it too).
    with pytest.raises(ConfigError, match="model.dino_hub: required value missing"):
        load([official["m2f"], "load_from=/w/head.pth", "datasets.root=/data/ade"], "eval")
    _, own = load([official["m2f"], "load_from=/w/head.pth", "model.dino_hub=dinov3_vitl16",
                   "model.pretrained_weights=/w/vitl.pth", "datasets.root=/data/ade"], "eval")
    assert own.head == "/w/head.pth" and own.transforms.eval.img_size == 896


@pytest.mark.parametrize("name", ["linear", "m2f"])
def test_official_configs_run_check_data(official, tmp_path, name, capsys):
    root = tmp_path / "ADEChallengeData2016"
    make_ade20k(root)
    assert main(["check-data", official[name], f"datasets.root={root}", "--split", "val"]) == 0
    capsys.readouterr()
    if name == "linear":
        assert main(["check-data", official[name], f"datasets.root={root}"]) == 0
    # Without a root (the official files leave it empty) the error names the key.
    assert main(["check-data", official[name], "--split", "val"]) == 2
    assert "datasets.root: required value missing" in capsys.readouterr().err


def test_official_config_trains(official, tmp_path):
    """The official linear file drives a (tiny) training run, with official and dinoseg keys on the command line."""
    backbone = [k for k in TINY if k.startswith("model.")]
    out = tmp_path / "run"
    code = main(["train", official["linear"], *backbone, "datasets.root=unused", "num_workers=0", "bs=2", "n_gpus=1",
                 "datasets.train=Synthetic:split=TRAIN:num_samples=8:image_size=64",
                 "datasets.val=Synthetic:split=VAL:num_samples=2:image_size=64", "eval.reduce_zero_label=false",
                 "decoder_head.num_classes=6", "transforms.train.img_size=64", "transforms.train.crop_size=[64,64]",
                 "transforms.eval.img_size=64", "eval.crop_size=48", "eval.stride=32", "eval.eval_interval=4",
                 "scheduler.total_iter=4", "scheduler.constructor_kwargs.warmup_iters=2", "train.checkpoint_interval=4",
                 f"output_dir={out}"])
    assert code == 0
    saved = OmegaConf.load(out / "segmentation_config.yaml")
    assert saved.train.batch_size == 2 and saved.scheduler.warmup_iters == 2 and saved.optimizer.gradient_clip == float("inf")
    assert (out / "checkpoint_last.pth").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("model.config_file=/x/train.yaml", "model.config_file='/x/train.yaml': dinoseg builds backbones by hub name"),
    ("scheduler.type=OneCycleLR", "scheduler.type='OneCycleLR'"),
    ("scheduler.constructor_kwargs.anneal_strategy=step", "anneal_strategy='step'"),
    ("decoder_head.use_cls_token=true", "decoder_head.use_cls_token=True: the official code ignores this key"),
    ("decoder_head.use_backbone_norm=false", "decoder_head.use_backbone_norm=False"),
    ("decoder_head.use_batchnorm=false", "decoder_head.use_batchnorm=False"),
    ("train.diceloss_weight=0.5", "train.diceloss_weight=0.5: with a positive Dice weight"),
    ("train.celoss_weight=0", "train.celoss_weight=0.0"),
    ("eval.mode=whole", "eval.mode='whole': the official evaluation always slides"),
    ("eval.compute_metric_per_image=true", "eval.compute_metric_per_image=True"),
    ("transforms.train.crop_size=[512,640]", "transforms.train.crop_size=[512, 640]: dinoseg crops squares"),
    ("transforms.train.img_size=[512,640]", "transforms.train.img_size=[512, 640]"),
    ("model_dtype=FLOAT16", "model_dtype='FLOAT16'"),
    ("metric_to_save=mAP", "metric_to_save='mAP'"),
    ("datasets.val=VOC:split=VAL", "eval.reduce_zero_label=True: dinoseg's PascalVOC loader returns train ids"),
    ("train.batch_size=8", "train.batch_size=8: set together with the official bs x n_gpus"),
])
def test_official_keys_that_cannot_be_honoured_are_refused(official, override, message):
    with pytest.raises(ConfigError) as err:
        load([official["linear"], "model.dino_hub=dinov3_vitl16", "datasets.root=/d", override], "train")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["check-data", official["linear"], "datasets.root=/d", override]) == 2


def test_reduce_zero_label_goes_to_the_datasets(official):
    _, cfg = load([official["linear"], "model.dino_hub=dinov3_vitl16", "datasets.root=/d", "eval.reduce_zero_label=false"],
                  "train")
    assert cfg.datasets.train == "ADE20K:split=TRAIN:reduce_zero_label=False"
    _, cfg = load([official["linear"], "model.dino_hub=dinov3_vitl16", "datasets.root=/d", "eval.reduce_zero_label=false",
                   "datasets.val=Cityscapes:split=VAL"], "train")
    assert cfg.datasets.val == "Cityscapes:split=VAL"


def test_dinoseg_configs_are_not_translated(caplog):
    with caplog.at_level(logging.INFO, logger="dinoseg"):
        _, cfg = load(["ade20k_linear.yaml", "model.pretrained_weights=/w.pth", "datasets.root=/d"], "train")
    assert not [r for r in caplog.records if "official" in r.getMessage()]
    assert cfg.train.batch_size == 16 and cfg.seed == 100


def test_the_shared_keys_are_reusable_by_another_task():
    """A task with its own official keys (the official depth config) reuses the shared translation: batch, seed,
    precision, optimizer, the official one-cycle defaults (beta1 schedule on, warmup_ratio 0, final_div 1000)."""
    seen = {}

    def translate_depth(config):
        seen["min_depth"] = config.take("decoder_head.min_depth")

    depth = OfficialSchema(markers=("losses",), defaults={
        "bs": 2, "n_gpus": 8, "num_workers": 2, "seed": 321, "model_dtype": None, "scheduler.type": "WarmupOneCycleLR",
        "scheduler.total_iter": 38_400, "optimizer.lr": 1e-4, "optimizer.beta1": 0.9, "optimizer.beta2": 0.999,
        "optimizer.weight_decay": 0.01, "optimizer.gradient_clip": 35.0}, translate=translate_depth)
    layers = read_layers([], [f"{k}={v}" for k, v in _flat(yaml.safe_load(NYU)).items()] + ["datasets.root=/nyu"])
    (layer,) = translate_layers(layers, depth)
    assert seen == {"min_depth": 0.001}
    assert layer.train.batch_size == 16 and layer.train.num_workers == 2 and layer.seed == 321
    assert layer.precision == "float32" and layer.optimizer.lr == 3e-4 and layer.optimizer.beta2 == 0.99
    s = layer.scheduler
    assert (s.total_iter, s.warmup_iters, s.warmup_ratio, s.final_div_factor, s.use_beta1) == (38400, 12800, 0.0, 1000.0, True)
    assert layer.decoder_head.max_depth == 10.0 and layer.datasets.train == "NYU:split=TRAIN"  # passed through


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
