"""Each depth configuration field reaches the object it configures (the engine tests cover the shared train.* loop
fields and the schedule's lr keys)."""

import pytest
import torch

from dinoseg.engine.config import Precision, scheduler_kwargs
from dinoseg.engine.schedulers import MomentumLambdaLR, build_scheduler
from dinoseg.eval.depth.config import ResultExtension, load_config
from dinoseg.eval.depth.loss import GradientLogLoss, L1Loss, SigLoss
from dinoseg.eval.depth.models import DPTHead, LinearHead
from dinoseg.eval.depth.models.embed import CenterPadding, StretchToMultiple
from dinoseg.eval.depth.setup import (
    build_backbone,
    build_criterion,
    build_model,
    build_optimizer,
    build_test_dataset,
    build_train_dataset,
    build_val_dataset,
    evaluation_settings,
    result_config,
)
from dinoseg.eval.depth.train import depth_loss, evaluation_loader_of
from dinoseg.eval.depth.transforms import (
    ColorAug,
    FixedCrop,
    LeftRightFlipAug,
    Normalize,
    NormalizeDepth,
    RandomCrop,
    RandomRotation,
    ResizeV2,
)

from ._depth_run import TINY_DEPTH


def cfg(*overrides):
    return load_config([], TINY_DEPTH + list(overrides))


def steps(dataset, kind):
    return [t for t in dataset.transforms.transforms if isinstance(t, kind)]


def test_model_fields():
    a, b = build_backbone(cfg()), build_backbone(cfg())
    torch.testing.assert_close(a.cls_token, b.cls_token)  # random_init_seed: the same random backbone every time
    assert not torch.equal(a.cls_token, build_backbone(cfg("model.random_init_seed=1")).cls_token)
    assert build_backbone(cfg("model.backbone_kwargs.depth=2")).n_blocks == 2


def test_decoder_fields():
    model = build_model(cfg())
    head = model.decoder
    assert isinstance(head, LinearHead) and head.conv_depth.out_channels == 16 and head.conv_depth.in_channels == 32
    assert isinstance(head.batchnorm_layer, torch.nn.BatchNorm2d) and model.encoder.backbone_out_indices == [3]
    assert model.encoder.final_norm and isinstance(model.encoder.patch_size_adapter, CenterPadding)
    f2d = model.features_to_depth
    assert (f2d.min_depth, f2d.max_depth, f2d.bins_strategy, f2d.norm_strategy) == (0.001, 10.0, "linear", "linear")
    four = build_model(cfg("decoder_head.backbone_out_layers=FOUR_LAST", "decoder_head.n_output_channels=1",
                           "decoder_head.use_batchnorm=false", "decoder_head.use_cls_token=true",
                           "decoder_head.use_backbone_norm=false", "decoder_head.adapt_to_patch_size=stretch",
                           "decoder_head.min_depth=0.5", "decoder_head.max_depth=20", "decoder_head.bins_strategy=log",
                           "decoder_head.norm_strategy=softmax"))
    assert four.encoder.backbone_out_indices == [0, 1, 2, 3] and four.decoder.conv_depth.in_channels == 4 * 32 * 2
    assert four.decoder.conv_depth.out_channels == 1 and isinstance(four.decoder.batchnorm_layer, torch.nn.Identity)
    assert not four.encoder.final_norm and isinstance(four.encoder.patch_size_adapter, StretchToMultiple)
    f2d = four.features_to_depth
    assert (f2d.min_depth, f2d.max_depth, f2d.bins_strategy, f2d.norm_strategy) == (0.5, 20, "log", "softmax")
    assert build_model(cfg("decoder_head.backbone_out_layers=[0,2]")).encoder.backbone_out_indices == [0, 2]
    dpt = build_model(cfg("decoder_head.type=dpt", "decoder_head.backbone_out_layers=FOUR_LAST",
                          "decoder_head.head_kwargs.channels=8", "decoder_head.head_kwargs.post_process_channels=[4,8,8,8]"))
    assert isinstance(dpt.decoder, DPTHead) and dpt.decoder.channels == 8 and dpt.decoder.post_process_channels == [4, 8, 8, 8]
    assert dpt(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_precision_sets_the_autocast_dtype(name, dtype):
    assert build_model(cfg(f"precision={name}")).autocast_dtype == Precision(name).dtype == dtype


def test_loss_weights():
    criterion = build_criterion(cfg())
    assert set(criterion.dict_losses) == {"SIGLOSS"} and isinstance(criterion.dict_losses["SIGLOSS"], SigLoss)
    mixed = build_criterion(cfg("losses.SIGLOSS=0", "losses.GRADIENT_LOG_LOSS=0.5", "losses.L1=2"))
    assert mixed.dict_weights == {"GRADIENT_LOG_LOSS": 0.5, "L1": 2.0}  # weight 0: not computed
    assert isinstance(mixed.dict_losses["GRADIENT_LOG_LOSS"], GradientLogLoss) and isinstance(mixed.dict_losses["L1"], L1Loss)


def test_optimizer_and_scheduler_fields():
    c = cfg("optimizer.lr=0.5", "optimizer.beta1=0.8", "optimizer.beta2=0.95", "optimizer.weight_decay=0.25",
            "scheduler.use_beta1=false", "scheduler.total_iter=10", "eval.eval_interval=10")
    model = build_model(c)
    opt = build_optimizer(model, c)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.5, (0.8, 0.95), 0.25)
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.decoder.parameters())
    build_scheduler(c.scheduler.type, opt, c.optimizer.lr, c.scheduler.total_iter, scheduler_kwargs(c.scheduler))
    assert group["betas"] == (0.8, 0.95)  # no beta1 cycle
    c = cfg("scheduler.base_momentum=0.5", "scheduler.max_momentum=0.6", "scheduler.warmup_iters=0")
    opt = build_optimizer(model, c)
    sched = build_scheduler(c.scheduler.type, opt, c.optimizer.lr, c.scheduler.total_iter, scheduler_kwargs(c.scheduler))
    assert isinstance(sched, MomentumLambdaLR) and opt.param_groups[0]["betas"][0] == pytest.approx(0.5)


def test_train_transform_fields():
    ds = build_train_dataset(cfg("transforms.train.img_size=[48,56]", "transforms.train.random_crop=[32,40]",
                                 "transforms.train.brightness_range=[0.5,0.6]", "transforms.train.rotation_angle=7",
                                 "transforms.train.fixed_crop=NYU", "transforms.mean=[0.5,0.5,0.5]",
                                 "transforms.std=[0.25,0.25,0.25]"))
    assert steps(ds, FixedCrop)[0].crop_type.value == "NYU" and steps(ds, ResizeV2)[0].size == [48, 56]
    assert steps(ds, RandomCrop)[0].size == (32, 40) and steps(ds, RandomRotation)[0].degrees == 7
    assert steps(ds, ColorAug)[0].brightness_range == (0.5, 0.6) and steps(ds, NormalizeDepth)[0].factor == 1000
    norm = steps(ds, Normalize)[0]
    assert norm.mean == [0.5] * 3 and norm.std == [0.25] * 3
    image, depth = ds[0]
    assert image.shape == (3, 32, 40) and depth.shape == (1, 32, 40)
    assert not steps(build_train_dataset(cfg()), ResizeV2) and not steps(build_train_dataset(cfg()), RandomCrop)


def test_train_eval_mask_limits_the_loss():
    depth = torch.full((1, 1, 48, 64), 3.0)
    pred = torch.full((1, 1, 48, 64), 3.0)
    pred[..., :2, :] = 9.0  # wrong only in the top rows, outside the NYU Eigen crop
    loss = torch.nn.L1Loss()

    def masked_l1(p, d, valid):
        return loss(p[valid], d[valid])

    assert depth_loss(masked_l1, pred, depth, "FULL", 0.0) > 0
    assert depth_loss(masked_l1, pred, depth, "NYU_EIGEN", 0.0) == 0
    depth[..., 10:, :] = 7.0  # ignored_value: these pixels have no depth
    assert depth_loss(masked_l1, pred, depth, "FULL", 7.0) == pytest.approx(6 * 2 / 10)


def test_eval_fields():
    c = cfg("eval.ignored_value=-1", "eval.align_least_squares=true", "eval.min_depth=0.5", "eval.max_depth=5",
            "eval.use_tta=false", "transforms.eval.eval_mask=NYU_EIGEN", "metrics=[a1,silog]", "eval.metric_to_save=a1",
            "transforms.eval.img_size=32", "transforms.eval.fixed_crop=NYU")
    s = evaluation_settings(c, use_tta=c.eval.use_tta)
    assert (s.ignored_value, s.align_least_squares, s.eval_range, s.use_tta) == (-1, True, (0.5, 5), False)
    assert s.eval_mask == "NYU_EIGEN" and s.metrics == ("a1", "silog")
    test = build_test_dataset(c)
    assert steps(test, ResizeV2)[0].size == [32] and steps(test, FixedCrop)[0].crop_type.value == "NYU"
    assert not steps(test, LeftRightFlipAug)[0]._flip
    assert steps(build_test_dataset(cfg()), LeftRightFlipAug)[0]._flip  # eval.use_tta (default true): test split
    assert not steps(build_val_dataset(cfg()), LeftRightFlipAug)[0]._flip  # validation: never
    assert len(evaluation_loader_of(build_val_dataset(cfg()), cfg(), cfg("eval.max_val_samples=2").eval.max_val_samples)) == 2


def test_dataset_fields(tmp_path):
    assert build_test_dataset(cfg()).split == "val"  # datasets.test null: the validation set
    test = build_test_dataset(cfg("datasets.test=SyntheticDepth:split=TEST:num_samples=3"))
    assert test.split == "test" and len(test) == 3
    from .test_depth_datasets import make_nyu

    make_nyu(tmp_path)
    nyu = build_val_dataset(cfg("datasets.val=NYU:split=VAL", f"datasets.root={tmp_path}"))
    assert nyu.root == str(tmp_path) and len(nyu) == 3
    # datasets.check_units: metres read as millimetres stop the training set, unless switched off.
    import numpy as np
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((24, 32), 3, np.uint16)).save(tmp_path / "train_scene_0" / f"sync_depth_{i:05d}.png")
    with pytest.raises(ValueError, match=r"sync_depth_00000.png: depth units look wrong: median valid depth 0.003 m"):
        build_train_dataset(cfg("datasets.train=NYU:split=TRAIN", f"datasets.root={tmp_path}"))
    assert len(build_train_dataset(cfg("datasets.train=NYU:split=TRAIN", f"datasets.root={tmp_path}",
                                       "datasets.check_units=false"))) == 2


def test_result_config_fields():
    r = result_config(cfg("result_config.save_results=true", "result_config.extension=pth",
                          "result_config.save_resolution=128", "result_config.overlay_alpha=0.5",
                          "result_config.save_separate_files=true"))
    assert (r.save_results, r.extension, r.save_resolution, r.overlay_alpha, r.save_separate_files) == (
        True, ResultExtension.PTH, 128, 0.5, True)


def test_finetune_blocks_count_back_from_the_deepest_block_the_head_reads():
    from dinoseg.engine.config import ConfigError

    model = build_model(cfg("decoder_head.backbone_out_layers=[0,1]", "model.finetune.mode=blocks",
                            "model.finetune.blocks=2"))
    trains = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")}
    assert trains == {"0", "1"}  # blocks 2 and 3 never run
    with pytest.raises(ConfigError, match=r"^model.finetune.blocks=3: must be an integer in \[1, 2\]: this backbone has "
                                          r"4 blocks \(the head reads up to block 1\)$"):
        build_model(cfg("decoder_head.backbone_out_layers=[0,1]", "model.finetune.mode=blocks", "model.finetune.blocks=3"))
    lora = build_model(cfg("decoder_head.backbone_out_layers=[1]", "model.finetune.mode=lora"))
    assert {n.split(".")[3] for n, p in lora.named_parameters() if p.requires_grad and n.startswith("encoder.")} == {"0", "1"}
