"""The official DINOv3 config files' keys and values, written here (no copy of the files is shipped), for the tests
of both tasks' official-config translation; `official_file` reads a file from the official repository's mirror when
it is on this machine, to check these are its contents."""

import subprocess
from pathlib import Path

import pytest

MIRROR = Path("/work/.mirror/facebookresearch+dinov3/repo")
needs_mirror = pytest.mark.skipif(not MIRROR.exists(), reason="the official repository's mirror is not on this machine")


def official_file(path: str) -> str:
    """The text of `path` (e.g. dinov3/eval/depth/configs/config-nyu.yaml) at the mirror's HEAD."""
    return subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:{path}"], capture_output=True, text=True,
                          check=True).stdout


# dinov3/eval/segmentation/configs/config-ade20k-linear-training.yaml (keys and values)
LINEAR = """
bs: 2
n_gpus: 8
metric_to_save: 'mIoU'
model_dtype: FLOAT32
scheduler:
  total_iter: 40000
  type: 'WarmupOneCycleLR'
  constructor_kwargs:
    warmup_iters: 1500
    warmup_ratio: 1e-6
    final_div_factor: .inf
    pct_start: 0
    anneal_strategy: 'cos'
    use_beta1: False
    update_momentum: False
optimizer:
  lr : 1e-3
  beta1: 0.9
  beta2: 0.999
  weight_decay: 1e-3
  gradient_clip: 'inf'
datasets:
  root: ""
  train: "ADE20K:split=TRAIN"
  val: "ADE20K:split=VAL"
train:
  diceloss_weight: 0.0
  celoss_weight: 1.0
decoder_head:
  type: "linear"
  backbone_out_layers: LAST
  use_cls_token: False
  use_batchnorm: True
  use_backbone_norm: True
  num_classes: 150
transforms:
  train:
    img_size: 512
    random_img_size_ratio_range: [0.5, 2.0]
    crop_size: [512, 512]
    flip_prob: 0.5
  eval:
    img_size: 512
eval:
  compute_metric_per_image: False
  reduce_zero_label: True
  mode: "slide"
  crop_size: 512
  stride: 341
  eval_interval: 5000
  use_tta: False
"""

# dinov3/eval/segmentation/configs/config-ade20k-m2f-inference.yaml (keys and values)
M2F = """
metric_to_save: 'mIoU'
datasets:
  root: ""
  val: "ADE20K:split=VAL"
decoder_head:
  type: "m2f"
  backbone_out_layers: FOUR_EVEN_INTERVALS
  num_classes: 150
transforms:
  eval:
    img_size: 896
    tta_ratios: [0.9, 0.95, 1.0, 1.05, 1.1]
eval:
  compute_metric_per_image: False
  reduce_zero_label: True
  mode: "slide"
  crop_size: 896
  stride: 596
  use_tta: True
"""


# dinov3/eval/depth/configs/config-nyu.yaml (keys and values)
NYU = """
bs: 2
n_gpus: 8
seed: 321
scheduler:
  total_iter: 38400
  type: WarmupOneCycleLR
  constructor_kwargs:
    final_div_factor: 1000.0
    warmup_iters: 12800
    base_momentum: 0.85
    max_momentum: 0.95
optimizer:
  lr: 3e-4
  beta1: 0.9
  beta2: 0.99
  weight_decay: 1e-4
  gradient_clip: 35
datasets:
  train: NYU:split=TRAIN
  val: NYU:split=VAL
  test: NYU:split=VAL
decoder_head:
  min_depth: 0.001
  max_depth: 10.0
  use_backbone_norm: true
  use_batchnorm: true
  backbone_out_layers: LAST
  type: linear
  use_cls_token: false
  n_output_channels: 256
losses:
  SIGLOSS: 1.0
transforms:
  train:
    random_crop: [416, 544]
    brightness_range: [0.75, 1.25]
    fixed_crop: NYU
    eval_mask: FULL
  eval:
    fixed_crop: FULL
    eval_mask: NYU_EIGEN
eval:
  min_depth: 0.001
  max_depth: 10.0
  use_tta: true
  align_least_squares: false
"""

# dinov3/eval/depth/configs/config-nyu-synthmix-dpt-inference.yaml (keys and values)
SYNTHMIX = """
datasets:
  test: NYU:split=VAL
transforms:
  eval:
    img_size: 768
    fixed_crop: FULL
    eval_mask: NYU_EIGEN
eval:
  min_depth: 0.001
  max_depth: 10.0
  use_tta: true
  align_least_squares: true
"""
