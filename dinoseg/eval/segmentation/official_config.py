"""The segmentation part of the official DINOv3 config schema (`dinov3/eval/segmentation/config.py`): its defaults
and the translation of its own keys (the shared ones are in `engine.official_config`).

`dinoseg train config-ade20k-linear-training.yaml model.dino_hub=dinov3_vitl16 datasets.root=/data/ade` and
`dinoseg eval config-ade20k-m2f-inference.yaml load_from=dinov3_vit7b16_ms datasets.root=/data/ade` run the
official files unchanged.
"""

import inspect

from ...data import DATASETS, parse_dataset_str
from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine.official_config import OfficialConfig, OfficialSchema
from .metrics import SUMMARY_NAMES
from .models.released import M2F_HEAD_HASHES

# The official `SegmentationConfig` defaults (a key an official file leaves out has this value there).
OFFICIAL_DEFAULTS = {
    "bs": 2, "n_gpus": 8, "num_workers": 6, "model_dtype": "FLOAT32", "seed": 100, "metric_to_save": "mIoU",
    "output_dir": None, "load_from": None, "datasets.train": "", "datasets.val": "",
    "decoder_head.type": "m2f", "decoder_head.backbone_out_layers": "LAST", "decoder_head.use_batchnorm": True,
    "decoder_head.use_cls_token": False, "decoder_head.use_backbone_norm": True, "decoder_head.num_classes": 150,
    "decoder_head.hidden_dim": 2048, "decoder_head.dropout": 0.1,
    "scheduler.type": "WarmupOneCycleLR", "scheduler.total_iter": 40_000,
    "optimizer.lr": 1e-3, "optimizer.beta1": 0.9, "optimizer.beta2": 0.999, "optimizer.weight_decay": 1e-2,
    "optimizer.gradient_clip": 35.0,
    "train.diceloss_weight": 0.0, "train.celoss_weight": 1.0,
    "transforms.train.img_size": None, "transforms.train.random_img_size_ratio_range": None,
    "transforms.train.crop_size": None, "transforms.train.flip_prob": 0.0,
    "transforms.eval.img_size": None, "transforms.eval.tta_ratios": [1.0],
    "transforms.mean": [m * 255 for m in IMAGENET_DEFAULT_MEAN], "transforms.std": [s * 255 for s in IMAGENET_DEFAULT_STD],
    "eval.compute_metric_per_image": False, "eval.reduce_zero_label": True, "eval.mode": "slide", "eval.crop_size": 512,
    "eval.stride": 341, "eval.eval_interval": 40_000, "eval.use_tta": False,
}  # fmt: skip
# Released segmentors the official `load_from` may name -> their backbone.
RELEASED_SEGMENTORS = {f"{backbone}_ms": backbone for backbone in M2F_HEAD_HASHES}
# Official decoder_head keys that the official code never reads, with the behaviour it always has.
_UNUSED_HEAD_KEYS = {"use_batchnorm": (True, "its linear head always has the batch norm"),
                     "use_cls_token": (False, "its linear head never uses the class token"),
                     "use_backbone_norm": (True, "the backbone's output norm is always applied")}  # fmt: skip


def _translate_head(config: OfficialConfig) -> None:
    take = config.take
    kind = take("decoder_head.type")
    if kind not in ("linear", "m2f"):
        config.refuse("decoder_head.type", kind, "expected 'linear' or 'm2f'")
    config.put("decoder_head.type", kind, "decoder_head.type")
    if kind == "m2f":  # the official adapter runs its backbone under bfloat16 autocast, whatever model_dtype says
        config.put("decoder_head.m2f.adapter.backbone_dtype", "bfloat16", "decoder_head.type", explicit=False,
                   note="the official adapter's backbone precision")
    config.put("decoder_head.backbone_out_layers", str(take("decoder_head.backbone_out_layers")),
               "decoder_head.backbone_out_layers")
    for key, cast in (("num_classes", int), ("hidden_dim", int), ("dropout", float)):
        config.put(f"decoder_head.{key}", cast(take(f"decoder_head.{key}")), f"decoder_head.{key}")
    for key, (value, behaviour) in _UNUSED_HEAD_KEYS.items():
        given = take(f"decoder_head.{key}")
        if bool(given) != value:
            config.refuse(f"decoder_head.{key}", given, f"the official code ignores this key ({behaviour}), so the "
                          "official result is not what it says; remove it (dinoseg configs have decoder_head.use_batchnorm "
                          "and .use_cls_token)")
        if key != "use_backbone_norm":
            config.put(f"decoder_head.{key}", value, f"decoder_head.{key}", note="not read by the official code")
        elif f"decoder_head.{key}" in config.given:
            config.note(f"decoder_head.{key}", given, f"not read by the official code; {behaviour}, as in dinoseg")


def _translate_loss(config: OfficialConfig) -> None:
    dice, ce = float(config.take("train.diceloss_weight")), float(config.take("train.celoss_weight"))
    if dice > 0:
        config.refuse("train.diceloss_weight", dice, "with a positive Dice weight the official loss is its multi-label "
                      "Dice loss alone, without cross-entropy; dinoseg adds a softmax Dice term to the cross-entropy")
    if ce <= 0:
        config.refuse("train.celoss_weight", ce, "the official loss is then empty (it fails at the first step)")
    config.put("train.diceloss_weight", 0.0, "train.diceloss_weight")
    config.put("train.celoss_weight", ce, "train.celoss_weight")


def _square(config: OfficialConfig, key: str, value) -> int:
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    config.refuse(key, value, "dinoseg crops squares; give equal sides")


def _translate_train_transforms(config: OfficialConfig) -> None:
    take = config.take
    size = take("transforms.train.img_size")
    given = "transforms.train.img_size" in config.given
    if isinstance(size, int):
        config.put("transforms.train.img_size", size, "transforms.train.img_size")
        ratio = take("transforms.train.random_img_size_ratio_range")
        ratio = [1.0, 1.0] if ratio is None else [float(r) for r in ratio]
        config.put("transforms.train.random_img_size_ratio_range", ratio, "transforms.train.random_img_size_ratio_range",
                   explicit=True)
    elif given:
        config.refuse("transforms.train.img_size", size, "dinoseg resizes the short side of training images to an int "
                      "(None: images of different sizes cannot be batched; (H, W): not supported)")
    crop = take("transforms.train.crop_size")
    if crop is not None:
        config.put("transforms.train.crop_size", _square(config, "transforms.train.crop_size", crop),
                   "transforms.train.crop_size")
    elif "transforms.train.crop_size" in config.given:
        config.refuse("transforms.train.crop_size", crop, "training images of different sizes cannot be batched")
    config.put("transforms.train.flip_prob", float(take("transforms.train.flip_prob")), "transforms.train.flip_prob")
    # Always part of the official training transform.
    config.put("transforms.train.photometric_distortion", True, "transforms.train", explicit=False,
               note="the official photometric distortion")
    config.put("transforms.train.hue_range", [-0.5, 0.5], "transforms.train", explicit=False)
    config.put("transforms.train.cat_max_ratio", 0.75, "transforms.train", explicit=False)


def _translate_eval(config: OfficialConfig) -> None:
    take = config.take
    mode = take("eval.mode")
    if mode != "slide":
        config.refuse("eval.mode", mode, "the official evaluation always slides (its 'whole' only resizes the label, so "
                      "metrics are computed at the resized size); dinoseg's eval.mode=whole is whole-image inference")
    config.put("eval.mode", "slide", "eval.mode")
    crop = int(take("eval.crop_size"))
    for key, value in (("crop_size", crop), ("stride", int(take("eval.stride"))),
                       ("eval_interval", int(take("eval.eval_interval"))), ("use_tta", bool(take("eval.use_tta")))):
        config.put(f"eval.{key}", value, f"eval.{key}")
    config.put("transforms.eval.tta_ratios", [float(r) for r in take("transforms.eval.tta_ratios")],
               "transforms.eval.tta_ratios")
    size = take("transforms.eval.img_size")
    if config.peek("load_from"):
        # Evaluating a head, the official code resizes to eval.crop_size (transforms.eval.img_size is its training
        # validation size).
        config.put("transforms.eval.img_size", crop, "eval.crop_size", note="the official size when evaluating a head")
    else:
        if size is not None and not isinstance(size, int):
            config.refuse("transforms.eval.img_size", size, "dinoseg resizes the short side to an int (or keeps the size)")
        config.put("transforms.eval.img_size", size, "transforms.eval.img_size")
    per_image = take("eval.compute_metric_per_image")
    if per_image:
        config.refuse("eval.compute_metric_per_image", per_image, "the official code ignores it (no per-image metrics)")
    for key in ("mean", "std"):
        values = [float(v) for v in take(f"transforms.{key}")]
        config.put(f"transforms.{key}", [v / 255 for v in values] if max(values) > 1 else values, f"transforms.{key}")


def _translate_reduce_zero_label(config: OfficialConfig) -> None:
    """Officially the labels are reduced in the transforms and metrics; dinoseg's datasets do it when they load
    labels, so the choice goes to each dataset (those without the option never reduce)."""
    reduce = bool(config.take("eval.reduce_zero_label"))
    for split in ("train", "val"):
        descriptor = config.out.get(f"datasets.{split}", (None,))[0]
        if not descriptor:
            continue
        spec = parse_dataset_str(descriptor)
        cls = DATASETS.get(str(spec["type"]).lower().replace("_", "").replace("-", ""))
        if cls is None or "reduce_zero_label" in spec:
            continue
        param = inspect.signature(cls.__init__).parameters.get("reduce_zero_label")
        if param is None:
            if reduce:
                config.refuse("eval.reduce_zero_label", reduce, f"dinoseg's {cls.__name__} loader returns train ids "
                              f"({descriptor}); reducing them would drop class 0")
            continue
        if param.default != reduce:
            config.put(f"datasets.{split}", f"{descriptor}:reduce_zero_label={reduce}", "eval.reduce_zero_label")
    config.note("eval.reduce_zero_label", reduce, "applied by dinoseg's dataset loaders")


def translate(config: OfficialConfig) -> None:
    """The segmentation keys of an official config (`engine.official_config` has done the shared ones)."""
    metric = config.take("metric_to_save")
    if metric not in SUMMARY_NAMES:
        config.refuse("metric_to_save", metric, f"expected one of {list(SUMMARY_NAMES)}")
    config.put("eval.metric_to_save", SUMMARY_NAMES[metric], "metric_to_save")
    load_from = config.take("load_from")
    if load_from:
        config.put("head", str(load_from), "load_from", note="the head that `dinoseg eval` / `predict` use")
        backbone = RELEASED_SEGMENTORS.get(str(load_from))
        if backbone and not {"model.dino_hub", "model.pretrained_weights"} & config.given:
            config.put("model.dino_hub", backbone, "load_from", explicit=False)
            config.put("model.pretrained_weights", "LVD1689M", "load_from", explicit=False,
                       note="the released segmentor's backbone weights, from the torch hub cache")
    _translate_head(config)
    _translate_loss(config)
    _translate_train_transforms(config)
    _translate_eval(config)
    _translate_reduce_zero_label(config)


# Official keys no other task's official schema has: an official config without `task` using one is segmentation's.
OWN_KEYS = ("metric_to_save", "train.diceloss_weight", "train.celoss_weight", "decoder_head.num_classes",
            "decoder_head.hidden_dim", "decoder_head.dropout", "transforms.train.random_img_size_ratio_range",
            "transforms.train.crop_size", "transforms.train.flip_prob", "transforms.eval.tta_ratios",
            "eval.compute_metric_per_image", "eval.reduce_zero_label", "eval.mode", "eval.crop_size", "eval.stride")

SEGMENTATION = OfficialSchema(markers=("metric_to_save",), defaults=OFFICIAL_DEFAULTS, translate=translate,
                              source="official DINOv3 segmentation config", own_keys=OWN_KEYS)
