"""The detection config: the official head fields and Plain-DETR's defaults, the shipped configs, every section's
effect on the objects a run builds, and the range checks naming the key."""

import dataclasses
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from dinoseg.engine.config import ConfigError
from dinoseg.engine.schedulers import SchedulerType
from dinoseg.eval.detection.config import DetectionHeadConfig, head_config, load_config
from dinoseg.eval.detection.loss import build_criterion as plain_detr_criterion
from dinoseg.eval.detection.models import PlainDETR, PlainDETRReParam
from dinoseg.eval.detection.models.position_encoding import PositionEncoding
from dinoseg.eval.detection.setup import (
    build_criterion,
    build_detector,
    build_optimizer,
    build_train_dataset,
    build_val_dataset,
)

from ._detection_run import BACKBONE, TINY_HEAD

TINY = ["task=detection", "device=cpu", *BACKBONE, *TINY_HEAD]
SYNTHETIC = ["datasets.train=SyntheticBoxes:split=TRAIN:num_samples=4:image_size=64",
             "datasets.val=SyntheticBoxes:split=VAL:num_samples=2:image_size=64"]


def test_decoder_head_holds_every_official_field_with_its_default():
    cfg = load_config([], ["task=detection"])
    official = DetectionHeadConfig()
    for f in dataclasses.fields(DetectionHeadConfig):
        value = cfg.decoder_head[f.name]
        if f.name == "num_classes":
            assert value is None  # from the training set or the head checkpoint (official: 91)
        elif f.name == "position_embedding":
            assert PositionEncoding(value) is official.position_embedding
        else:
            assert value == getattr(official, f.name), f.name
    # Plain-DETR's loss coefficients, matcher costs and focal alpha (its main.py), as the loss module builds them.
    defaults = inspect.signature(plain_detr_criterion).parameters
    for key in ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "set_cost_class", "set_cost_bbox", "set_cost_giou",
                "focal_alpha"):
        assert cfg.decoder_head[key] == defaults[key].default, key
    # Plain-DETR's optimisation (main.py): AdamW at 2e-4, weight decay 1e-4, clip 0.1, backbone 2e-5, a step drop.
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.gradient_clip) == (2e-4, 1e-4, 0.1)
    assert cfg.optimizer.lr_backbone == 2e-5 and list(cfg.optimizer.lr_backbone_names) == ["backbone.0"]
    assert cfg.optimizer.wd_norm_mult == 1.0 and "relative_position_bias_table" in cfg.optimizer.wd_norm_names
    assert SchedulerType(cfg.scheduler.type) is SchedulerType.STEP and cfg.scheduler.warmup_ratio == 0.0
    assert list(cfg.scheduler.milestones) == [81_312] and cfg.scheduler.total_iter == 88_704  # 11 and 12 epochs
    assert list(cfg.transforms.train.scales)[::5] == [480, 640, 800] and cfg.transforms.eval.size == 800


@pytest.mark.parametrize("name, overrides", [
    ("demo_detection.yaml", []),
    ("coco_vitl16_plain_detr.yaml", ["model.pretrained_weights=/w/vitl16.pth", "datasets.root=/data/coco"]),
    ("coco_dinov3_vit7b16_de_inference.yaml", ["datasets.root=/data/coco"]),
])
def test_shipped_detection_configs_load(name, overrides):
    cfg = load_config([name], overrides)
    assert cfg.task == "detection"


def test_the_recipe_and_the_inference_config_say_what_they_are():
    recipe = load_config(["coco_vitl16_plain_detr.yaml"], ["model.pretrained_weights=/w/l.pth", "datasets.root=/d"])
    assert recipe.model.dino_hub == "dinov3_vitl16" and recipe.train.batch_size == 16
    assert (recipe.optimizer.lr, recipe.optimizer.weight_decay, recipe.optimizer.wd_norm_mult) == (2e-4, 0.05, 0.0)
    assert (recipe.decoder_head.bbox_loss_coef, recipe.decoder_head.set_cost_bbox) == (1.0, 1.0)
    assert recipe.scheduler.warmup_iters == 1000 and recipe.optimizer.gradient_clip == 0.1
    inference = load_config(["coco_dinov3_vit7b16_de_inference.yaml"], ["datasets.root=/d"])
    assert inference.head == "dinov3_vit7b16_de" and "category_ids_as_labels=true" in inference.datasets.val


def test_head_settings_reach_the_detector():
    cfg = load_config([], [*TINY, "decoder_head.num_queries_one2one=7", "decoder_head.num_queries_one2many=5",
                           "decoder_head.dec_layers=3", "decoder_head.layers_to_use=[0,3]", "decoder_head.encoder_dropout=0.2",
                           "decoder_head.reparam=true"])
    model = build_detector(cfg, num_classes=6)
    assert isinstance(model, PlainDETRReParam)
    assert model.query_embed.weight.shape == (12, 32)  # mixed selection: content of 7 + 5 queries, hidden 32
    assert model.class_embed[0].out_features == 6 and len(model.transformer.decoder.layers) == 3
    assert len(model.transformer.encoder.layers) == 1 and model.backbone[0].layers_to_use == [0, 3]
    assert model.input_proj[0][0].in_channels == 2 * 32  # two blocks of the 32-wide ViT
    assert model.transformer.encoder.layers[0].dropout.p == 0.2
    assert head_config(cfg, 6).num_classes == 6 and head_config(cfg).num_classes == 91  # the official default
    plain = build_detector(load_config([], TINY), num_classes=2)
    assert type(plain) is PlainDETR and plain.num_queries_one2one == 10


def test_loss_settings_reach_the_criterion():
    cfg = load_config([], [*TINY, "decoder_head.cls_loss_coef=3", "decoder_head.bbox_loss_coef=1",
                           "decoder_head.giou_loss_coef=4", "decoder_head.set_cost_class=1.5",
                           "decoder_head.set_cost_bbox=0.5", "decoder_head.set_cost_giou=2.5", "decoder_head.focal_alpha=0.5",
                           "decoder_head.aux_loss=false", "decoder_head.reparam=true"])
    criterion = build_criterion(cfg, num_classes=5)
    assert criterion.weight_dict["loss_ce"] == 3 and criterion.weight_dict["loss_bbox_enc"] == 1
    assert criterion.weight_dict["loss_giou_one2many"] == 4 and "loss_ce_0" not in criterion.weight_dict  # aux_loss off
    m = criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.cost_bbox_type) == (1.5, 0.5, 2.5, "reparam")
    assert criterion.focal_alpha == 0.5 and criterion.num_classes == 5


def test_optimizer_groups_follow_plain_detr():
    cfg = load_config([], [*TINY, "decoder_head.backbone_use_layernorm=true", "optimizer.lr=1e-3", "optimizer.lr_backbone=1e-4",
                           "optimizer.weight_decay=0.05", "optimizer.wd_norm_mult=0.0"])
    model = build_detector(cfg, num_classes=3)
    optimizer = build_optimizer(model, cfg)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = {n: by_param[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("backbone.0.backbone.") for n in names)  # the frozen ViT is not optimised
    for name, group in names.items():
        backbone = "backbone.0" in name
        norm = any(k in name for k in cfg.optimizer.wd_norm_names)
        assert group["lr_scale"] == pytest.approx(0.1 if backbone else 1.0), name
        assert group["weight_decay"] == (0.0 if norm else 0.05), name
    assert names["backbone.0.layer_norms.0.ln.weight"]["lr"] == pytest.approx(1e-4)
    assert names["transformer.level_embed"]["weight_decay"] == 0.0 and names["query_embed.weight"]["weight_decay"] == 0.05
    assert optimizer.param_groups[0]["lr_scale"] == 1.0 and optimizer.param_groups[0]["weight_decay"] == 0.05


def test_transform_settings_shape_the_samples():
    base = [*TINY, *SYNTHETIC, "transforms.train.max_size=null", "transforms.train.crop_scales=null",
            "transforms.eval.max_size=null"]
    cfg = load_config([], [*base, "transforms.train.scales=[80]", "transforms.eval.size=48", "transforms.train.flip_prob=0"])
    image, target = build_train_dataset(cfg)[0]
    assert image.shape[-2:] == (80, 80) and (target["boxes"] <= 1).all()  # normalised cx, cy, w, h
    image, target = build_val_dataset(cfg)[0]
    assert image.shape[-2:] == (48, 48) and target["size"].tolist() == [48, 48] and target["orig_size"].tolist() == [64, 64]
    reparam = load_config([], [*base, "transforms.train.scales=[80]", "decoder_head.reparam=true",
                               "transforms.train.flip_prob=0"])
    _, pixels = build_train_dataset(reparam)[0]
    _, normalised = build_train_dataset(cfg)[0]
    assert torch.allclose(pixels["boxes"], normalised["boxes"] * 80, atol=1e-4)  # pixels for the reparam detector
    flipped = load_config([], [*base, "transforms.train.scales=[80]", "transforms.train.flip_prob=1"])
    _, mirrored = build_train_dataset(flipped)[0]
    assert torch.allclose(mirrored["boxes"][:, 0], 1 - normalised["boxes"][:, 0], atol=1e-5)
    normalisation = load_config([], [*base, "transforms.mean=[0,0,0]", "transforms.std=[1,1,1]"])
    assert build_val_dataset(normalisation)[0][0].min() >= 0  # the image in [0, 1]: mean 0, std 1


@pytest.mark.parametrize("override, message", [
    ("decoder_head.num_classes=0", "decoder_head.num_classes=0: must be positive"),
    ("decoder_head.k_one2many=0", "decoder_head.k_one2many=0: must be positive"),
    ("decoder_head.num_queries_one2one=0", "decoder_head.num_queries_one2one=0: must be positive"),
    ("decoder_head.norm_type=batch", "decoder_head.norm_type='batch': expected pre_norm or post_norm"),
    ("decoder_head.decoder_rpe_type=log", "decoder_head.decoder_rpe_type='log': expected linear or abs_log8"),
    ("decoder_head.layers_to_use=[]", "decoder_head.layers_to_use=[]: expected the number of last blocks"),
    ("decoder_head.dropout=1.0", "decoder_head.dropout=1.0: must be in [0, 1)"),
    ("decoder_head.position_embedding=cosine", "decoder_head.position_embedding='cosine': expected one of"),
    ("decoder_head.bbox_loss_coef=-1", "decoder_head.bbox_loss_coef=-1.0: must be a finite number >= 0"),
    ("decoder_head.two_stage=false", "decoder_head: decoder_type='global_rpe_decomp' needs two_stage=True"),
    ("decoder_head.hidden_dim=40", "decoder_head: hidden_dim=40 must be a multiple of 32"),
    ("optimizer.wd_norm_mult=-1", "optimizer.wd_norm_mult=-1.0: must be >= 0"),
    ("transforms.train.scales=[]", "transforms.train.scales=[]: expected a non-empty list of positive sizes"),
    ("transforms.train.crop_max_size=100", "transforms.train.crop_max_size=100: must be >= transforms.train.crop_min_size=384"),
    ("transforms.train.max_size=400", "transforms.train.max_size=400: must be >= the smallest of transforms.train.scales"),
    ("transforms.eval.max_size=700", "transforms.eval.max_size=700: must be >= transforms.eval.size=800"),
    ("eval.score_threshold=2", "eval.score_threshold=2.0: must be in [0, 1]"),
    ("eval.metric_to_save=mAP", "eval.metric_to_save='mAP': expected one of ['AP'"),
    ("task=depth", "task='depth'"),
])
def test_values_are_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config([], ["task=detection", override])
    assert message in str(error.value)


def test_both_loss_and_cost_weights_all_zero_are_refused():
    with pytest.raises(ConfigError, match="set_cost_class, set_cost_bbox and set_cost_giou are all 0"):
        load_config([], ["task=detection", "decoder_head.set_cost_class=0", "decoder_head.set_cost_bbox=0",
                         "decoder_head.set_cost_giou=0"])
    with pytest.raises(ConfigError, match="no loss to train"):
        load_config([], ["task=detection", "decoder_head.cls_loss_coef=0", "decoder_head.bbox_loss_coef=0",
                         "decoder_head.giou_loss_coef=0"])
    assert OmegaConf.select(load_config([], ["task=detection"]), "decoder_head.focal_alpha") == 0.25


def test_the_inference_config_is_the_released_head():
    from dinoseg.eval.detection.models.released import N_WINDOWS_SQRT, released_head_config

    cfg = load_config(["coco_dinov3_vit7b16_de_inference.yaml"], ["datasets.root=/d"])
    released = released_head_config()
    released.n_windows_sqrt = N_WINDOWS_SQRT["dinov3_vit7b16"]
    assert head_config(cfg) == released  # so head=<the released file> builds the released detector too


def test_released_head_config_for_a_backbone():
    from dinoseg.eval.detection.models.released import N_WINDOWS_SQRT, released_head_config

    for name, windows in N_WINDOWS_SQRT.items():
        expected = released_head_config()
        expected.n_windows_sqrt = windows
        assert released_head_config(backbone_name=name) == expected
    assert released_head_config().n_windows_sqrt == 0  # the official call form: windows left to the caller
    with pytest.raises(ValueError, match="no detector for backbone 'dinov3_vitb16'"):
        released_head_config(backbone_name="dinov3_vitb16")
