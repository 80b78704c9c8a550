"""The depth part of the official DINOv3 config schema (`dinov3/eval/depth/config.py`): its defaults and the
translation of its own keys (the shared ones are in `engine.official_config`).

`dinoseg train config-nyu.yaml model.dino_hub=dinov3_vitl16 model.pretrained_weights=/w/vitl16.pth
datasets.root=/data/nyu` and `dinoseg eval config-nyu-synthmix-dpt-inference.yaml load_from=dinov3_vit7b16_dd
datasets.root=/data/nyu` run the official files unchanged; an official config without `task` is depth's when it
has one of `OWN_KEYS` (`losses`, `decoder_head.min_depth`, ...).

Most depth keys keep their official names in dinoseg (its depth config is the official schema); the translation
completes them with the official defaults and handles what differs: `losses: {TYPE: weight}` names every loss
(a type it leaves out weighs 0), a linear head ignores `decoder_head.head_kwargs` officially, the official trainer
writes a checkpoint at each validation, and a released depther named by `load_from` brings its backbone and head.
"""

import dataclasses
from enum import Enum

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine.official_config import REQUIRED, OfficialConfig, OfficialSchema
from .loss import LossType
from .models.released import RELEASED_DEPTHERS, dpt_depther_config

# The official `DepthConfig` defaults (a key an official file leaves out has this value there). `datasets.train` and
# `.val` are left out: the shared translation skips them when the file does, and `_translate_datasets` decides.
OFFICIAL_DEFAULTS = {
    "bs": 2, "n_gpus": 8, "num_workers": 2, "seed": 321, "model_dtype": None, "output_dir": "", "load_from": None,
    "datasets.test": "",
    "scheduler.type": "WarmupOneCycleLR", "scheduler.total_iter": 38_400,
    "optimizer.lr": 1e-4, "optimizer.beta1": 0.9, "optimizer.beta2": 0.999, "optimizer.weight_decay": 0.01,
    "optimizer.gradient_clip": 35.0,
    "decoder_head.min_depth": 0.001, "decoder_head.max_depth": 80.0, "decoder_head.bins_strategy": "linear",
    "decoder_head.norm_strategy": "linear", "decoder_head.head_kwargs": {},
    "decoder_head.backbone_out_layers": "FOUR_EVEN_INTERVALS", "decoder_head.adapt_to_patch_size": "CENTER_PADDING",
    "decoder_head.use_backbone_norm": True, "decoder_head.type": "linear", "decoder_head.n_output_channels": 256,
    "decoder_head.use_batchnorm": False, "decoder_head.use_cls_token": False,
    "losses": None,
    "transforms.train.img_size": None, "transforms.train.random_crop": None, "transforms.train.brightness_range": [0.9, 1.1],
    "transforms.train.rotation_angle": 2.5, "transforms.train.fixed_crop": "FULL", "transforms.train.eval_mask": "FULL",
    "transforms.eval.img_size": None, "transforms.eval.fixed_crop": "FULL", "transforms.eval.eval_mask": "FULL",
    "transforms.mean": list(IMAGENET_DEFAULT_MEAN), "transforms.std": list(IMAGENET_DEFAULT_STD),
    "transforms.normalization_constant": 1000.0,
    "eval.ignored_value": 0.0, "eval.align_least_squares": False, "eval.min_depth": 0.001, "eval.max_depth": 10.0,
    "eval.use_tta": True, "eval.eval_interval": 1600,
    "metrics": ["rmse", "abs_rel", "a1"],
    "result_config.save_results": False, "result_config.extension": "JPG", "result_config.save_resolution": None,
    "result_config.overlay_alpha": 1.0, "result_config.save_separate_files": False,
}  # fmt: skip

# Official keys no other task's official schema has: an official config without `task` using one is depth's.
OWN_KEYS = ("losses", "metrics", "result_config", "datasets.test", "decoder_head.min_depth", "decoder_head.max_depth",
            "decoder_head.n_output_channels", "decoder_head.bins_strategy", "decoder_head.norm_strategy",
            "decoder_head.head_kwargs", "decoder_head.adapt_to_patch_size", "transforms.normalization_constant",
            "transforms.train.random_crop", "transforms.train.brightness_range", "transforms.train.rotation_angle",
            "transforms.train.fixed_crop", "transforms.train.eval_mask", "transforms.eval.fixed_crop",
            "transforms.eval.eval_mask", "eval.ignored_value", "eval.align_least_squares", "eval.min_depth",
            "eval.max_depth")

# Official keys that keep their name and value in dinoseg, by section (the decoder's `type` and `head_kwargs` and the
# evaluation interval are translated on their own).
_SAME_KEYS = {
    "decoder_head": ("min_depth", "max_depth", "bins_strategy", "norm_strategy", "backbone_out_layers",
                     "adapt_to_patch_size", "use_backbone_norm", "n_output_channels", "use_batchnorm", "use_cls_token"),
    "transforms.train": ("img_size", "random_crop", "brightness_range", "rotation_angle", "fixed_crop", "eval_mask"),
    "transforms.eval": ("img_size", "fixed_crop", "eval_mask"),
    "transforms": ("mean", "std", "normalization_constant"),
    "eval": ("ignored_value", "align_least_squares", "min_depth", "max_depth", "use_tta"),
    "result_config": ("save_results", "extension", "save_resolution", "overlay_alpha", "save_separate_files"),
}


def _take_mapping(config: OfficialConfig, key: str) -> tuple[dict | None, bool]:
    """(the official mapping at `key`, such as `losses`, or None; whether the config gave it): its entries arrive
    flattened (`losses.SIGLOSS`), or whole when empty or null."""
    prefix = f"{key}."
    entries = [k for k in config.values if k.startswith(prefix)]
    if entries:
        return {k[len(prefix):]: config.take(k) for k in entries}, True
    given = key in config.values
    value = config.take(key)
    return (None if value is None else dict(value)), given


def _plain(value):
    return value.name if isinstance(value, Enum) else value


def _translate_load_from(config: OfficialConfig) -> str | None:
    """`load_from` -> `head`; returns the backbone of a released depther it names (else None)."""
    load_from = config.take("load_from")
    if not load_from:
        return None
    config.put("head", str(load_from), "load_from", note="the head that `dinoseg eval` / `predict` use (officially a run "
               "with load_from only evaluates it)")
    released = RELEASED_DEPTHERS.get(str(load_from))
    if released is None:
        return None
    backbone = released[0]
    # Officially the released depther brings its backbone, whatever `model` says; a weights file is where dinoseg
    # finds the same weights.
    hub = config.out.get("model.dino_hub", (None,))[0]
    if "model.dino_hub" in config.given and hub != backbone:
        config.note("model.dino_hub", hub, f"replaced by the released depther's backbone {backbone} (as officially)")
    config.put("model.dino_hub", backbone, "load_from")
    if "model.pretrained_weights" not in config.given:
        config.put("model.pretrained_weights", "LVD1689M", "load_from",
                   note="the released depther's backbone weights, from the torch hub cache")
    return backbone


def _use_released_head(config: OfficialConfig, backbone: str) -> None:
    """Officially the released depther's head settings are merged over decoder_head."""
    for key, value in dataclasses.asdict(dpt_depther_config(backbone)).items():
        official = f"decoder_head.{key}"
        if official in config.values or any(k.startswith(f"{official}.") for k in config.values):
            given = _take_mapping(config, official)[0] if key == "head_kwargs" else config.take(official)
            config.note(official, given, "replaced by the released depther's head (as officially)")
        config.put(official, _plain(value), "load_from")


def _translate_datasets(config: OfficialConfig) -> None:
    evaluating = "head" in config.out
    for split in ("train", "val"):
        if f"datasets.{split}" in config.out:  # given: translated with the shared keys
            continue
        if evaluating:
            config.note(f"datasets.{split}", "", "not given; not read when evaluating a head (load_from)")
        else:
            config.put(f"datasets.{split}", REQUIRED, f"datasets.{split}", explicit=False,
                       note="required (the official file leaves it empty)")
    test = config.take("datasets.test")
    if test:
        config.put("datasets.test", str(test), "datasets.test")
    else:  # officially the final evaluation then fails
        config.put("datasets.test", None, "datasets.test", note="empty: dinoseg evaluates datasets.val")


def _translate_head(config: OfficialConfig) -> None:
    take = config.take
    kind = take("decoder_head.type")
    config.put("decoder_head.type", kind, "decoder_head.type")
    for key in _SAME_KEYS["decoder_head"]:
        config.put(f"decoder_head.{key}", take(f"decoder_head.{key}"), f"decoder_head.{key}")
    kwargs, given = _take_mapping(config, "decoder_head.head_kwargs")
    if kind == "linear" and kwargs:
        config.note("decoder_head.head_kwargs", kwargs, "ignored: the official linear head takes none of them")
        kwargs = {}
    config.put("decoder_head.head_kwargs", kwargs or {}, "decoder_head.head_kwargs", explicit=given)


def _translate_losses(config: OfficialConfig) -> None:
    weights, given = _take_mapping(config, "losses")
    if weights is None:
        if "head" not in config.out:
            config.note("losses", None, "not given (the official training then stops: no loss); dinoseg's default "
                        "losses.SIGLOSS=1.0 applies")
        return
    names = {t.name: t for t in LossType} | {t.value: t for t in LossType}
    chosen = {}
    for name, weight in weights.items():
        loss = names.get(str(name)) or names.get(str(name).upper())
        if loss is None:
            config.refuse(f"losses.{name}", weight, f"not a depth loss; expected some of {[t.name for t in LossType]}")
        chosen[loss] = float(weight)
    for loss in LossType:  # the official dict names every loss computed: the others weigh 0
        config.put(f"losses.{loss.name}", chosen.get(loss, 0.0), "losses", explicit=given)


def _translate_evaluation(config: OfficialConfig) -> None:
    take = config.take
    for section in ("transforms.train", "transforms.eval", "transforms", "eval", "result_config"):
        for key in _SAME_KEYS[section]:
            config.put(f"{section}.{key}", _plain(take(f"{section}.{key}")), f"{section}.{key}")
    total = config.out["scheduler.total_iter"][0]
    interval = int(take("eval.eval_interval"))
    if interval < 1:
        config.refuse("eval.eval_interval", interval, "must be >= 1 (the official trainer divides by it)")
    if interval > total:  # officially validated once, after the last iteration: what dinoseg does at total_iter
        config.put("eval.eval_interval", total, "eval.eval_interval",
                   note=f"{interval} > scheduler.total_iter: one validation, after the last iteration, as officially")
    else:
        config.put("eval.eval_interval", interval, "eval.eval_interval")
    config.put("train.checkpoint_interval", min(interval, total), "eval.eval_interval", explicit=False,
               note="the official trainer writes a checkpoint at each validation")
    metrics = [str(m) for m in take("metrics") or []]
    config.put("metrics", metrics, "metrics")
    if "rmse" not in metrics and metrics:  # dinoseg's default eval.metric_to_save; no official counterpart
        config.put("eval.metric_to_save", metrics[0], "metrics", explicit=False, note="chooses checkpoint_best.pth")


def translate(config: OfficialConfig) -> None:
    """The depth keys of an official config (`engine.official_config` has done the shared ones)."""
    released = _translate_load_from(config)
    if released:
        _use_released_head(config, released)
    else:
        _translate_head(config)
    _translate_datasets(config)
    _translate_losses(config)
    _translate_evaluation(config)


DEPTH = OfficialSchema(markers=(), defaults=OFFICIAL_DEFAULTS, translate=translate, source="official DINOv3 depth config",
                       own_keys=OWN_KEYS)
