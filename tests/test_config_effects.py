"""Each configuration field reaches the object it configures (the engine tests cover the train.* loop fields)."""

import pytest
import torch

from dinoseg.engine.config import ConfigError, Precision
from dinoseg.eval.segmentation.config import load_config
from dinoseg.eval.segmentation.inference import InferenceMode
from dinoseg.eval.segmentation.setup import (
    build_backbone,
    build_model,
    build_optimizer,
    build_train_dataset,
    inference_settings,
)
from dinoseg.eval.segmentation.transforms import (
    Normalize,
    PhotoMetricDistortion,
    RandomCropCatMax,
    RandomHorizontalFlip,
    RandomShortSideResize,
)
from dinoseg.models.checkpoint import CheckpointError

from .engine_utils import TINY


def cfg(*overrides):
    return load_config([], TINY + list(overrides))


def test_model_fields():
    a = build_backbone(cfg())
    b = build_backbone(cfg())
    torch.testing.assert_close(a.cls_token, b.cls_token)  # random_init_seed: the same random backbone every time
    c = build_backbone(cfg("model.random_init_seed=1"))
    assert not torch.equal(a.cls_token, c.cls_token)
    assert build_backbone(cfg("model.backbone_kwargs.depth=2")).n_blocks == 2
    hub = build_backbone(load_config([], ["model.backbone_kwargs.depth=1", "model.random_init=true"]))  # dinov3_vits16
    assert hub.embed_dim == 384 and hub.n_blocks == 1  # hub architecture + keyword override
    assert all(not p.requires_grad for p in a.parameters()) and not a.training


SMALL_HUB = ["model.backbone_kwargs.depth=1", "model.backbone_kwargs.embed_dim=32", "model.backbone_kwargs.num_heads=2"]


def test_backbone_weights_are_given_or_cached_and_random_only_when_asked(tmp_path, monkeypatch):
    """model.pretrained_weights / model.random_init: a hub backbone without weights takes the released file from the
    torch hub cache, or stops saying where it looked and how to pass them; a custom one stops; random when asked."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    with pytest.raises(CheckpointError) as missing:
        build_backbone(load_config([], SMALL_HUB))
    message = str(missing.value)
    assert f"({cached} not found)" in message and "model.pretrained_weights=" in message
    assert "model.random_init=true" in message and "dl.fbaipublicfiles.com" in message
    with pytest.raises(CheckpointError, match=rf"^model.pretrained_weights=LVD1689M: the released LVD1689M weights of "
                                              rf"dinov3_vits16 are not in the torch hub cache \({cached} not found\)"):
        build_backbone(load_config([], [*SMALL_HUB, "model.pretrained_weights=LVD1689M"]))
    with pytest.raises(CheckpointError, match=r"^model.pretrained_weights=SAT493M: dinov3_vits16: no official SAT493M"):
        build_backbone(load_config([], [*SMALL_HUB, "model.pretrained_weights=SAT493M"]))
    with pytest.raises(CheckpointError, match=r"model.dino_hub=null .* pass model.pretrained_weights=<checkpoint>, "
                                              r"or model.random_init=true"):
        build_backbone(cfg("model.random_init=false"))

    released = build_backbone(load_config([], [*SMALL_HUB, "model.random_init=true", "model.random_init_seed=7"]))
    cached.parent.mkdir(parents=True)
    torch.save(released.state_dict(), cached)
    found = build_backbone(load_config([], SMALL_HUB))  # no weights given: the cached file, not random ones
    assert all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), released.state_dict().values()))
    randomly = build_backbone(load_config([], [*SMALL_HUB, "model.random_init=true"]))  # asked for: random, cache unused
    assert not torch.equal(randomly.cls_token, released.cls_token)
    with pytest.raises(ConfigError, match=r"^model.random_init=true asks for random backbone weights, "
                                          r"model.pretrained_weights='/w.pth' for these: choose one$"):
        load_config([], [*SMALL_HUB, "model.random_init=true", "model.pretrained_weights=/w.pth"])


def test_decoder_fields():
    head = build_model(cfg(), num_classes=5).segmentation_model[1]
    assert head.conv.out_channels == 5 and head.conv.in_channels == 32
    assert isinstance(head.batchnorm_layer, torch.nn.BatchNorm2d)
    assert build_model(cfg("decoder_head.num_classes=9"), num_classes=9).segmentation_model[1].conv.out_channels == 9
    four = build_model(cfg("decoder_head.backbone_out_layers=FOUR_LAST"), 5)
    assert four.segmentation_model[0].n == [0, 1, 2, 3] and four.segmentation_model[1].conv.in_channels == 128
    cls = build_model(cfg("decoder_head.use_cls_token=true"), 5).segmentation_model[1]
    assert cls.conv.in_channels == 64
    no_bn = build_model(cfg("decoder_head.use_batchnorm=false"), 5).segmentation_model[1]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in no_bn.modules())
    drop = build_model(cfg("decoder_head.dropout=0.3"), 5).segmentation_model[1]
    assert [m.p for m in drop.modules() if isinstance(m, torch.nn.Dropout2d)] == [0.3]
    m2f = build_model(cfg("decoder_head.type=m2f", "decoder_head.hidden_dim=32", "decoder_head.m2f.num_queries=7",
                          "decoder_head.m2f.nheads=2", "decoder_head.m2f.dim_feedforward=48",
                          "decoder_head.m2f.enc_layers=1", "decoder_head.m2f.dec_layers=2",
                          "decoder_head.m2f.pixel_decoder_nheads=2", "decoder_head.backbone_out_layers=FOUR_EVEN_INTERVALS"), 5)
    sd = m2f.state_dict()
    assert sd["segmentation_model.1.predictor.query_feat.weight"].shape == (7, 32)
    assert sd["segmentation_model.1.predictor.class_embed.weight"].shape == (6, 32)
    assert sd["segmentation_model.1.predictor.transformer_ffn_layers.0.linear1.weight"].shape == (48, 32)
    assert len([k for k in sd if k.endswith("transformer_ffn_layers.1.norm.weight")]) == 1
    assert not any(".transformer_ffn_layers.2." in k for k in sd)
    assert not any(".encoder.layers.1." in k for k in sd)


def test_optimizer_fields():
    model = build_model(cfg("optimizer.lr=0.5", "optimizer.beta1=0.8", "optimizer.beta2=0.95",
                            "optimizer.weight_decay=0.25"), 5)
    opt = build_optimizer(model, cfg("optimizer.lr=0.5", "optimizer.beta1=0.8", "optimizer.beta2=0.95",
                                     "optimizer.weight_decay=0.25"))
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.5, (0.8, 0.95), 0.25)
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.segmentation_model[1].parameters())


def test_transform_fields():
    ds = build_train_dataset(cfg("transforms.train.img_size=80", "transforms.train.random_img_size_ratio_range=[1.5,1.5]",
                                 "transforms.train.crop_size=48", "transforms.train.cat_max_ratio=0.5",
                                 "transforms.train.flip_prob=0.25", "transforms.train.photometric_distortion=false",
                                 "transforms.mean=[0.5,0.5,0.5]", "transforms.std=[0.25,0.25,0.25]"))
    steps = ds.transforms.transforms
    resize = next(t for t in steps if isinstance(t, RandomShortSideResize))
    assert resize.img_size == 80 and tuple(resize.ratio_range) == (1.5, 1.5)
    crop = next(t for t in steps if isinstance(t, RandomCropCatMax))
    assert crop.crop_size == (48, 48) and crop.cat_max_ratio == 0.5
    assert next(t for t in steps if isinstance(t, RandomHorizontalFlip)).p == 0.25
    assert not any(isinstance(t, PhotoMetricDistortion) for t in steps)
    norm = next(t for t in steps if isinstance(t, Normalize))
    assert list(norm.mean) == [0.5] * 3 and list(norm.std) == [0.25] * 3
    image, label = ds[0]
    assert image.shape == (3, 48, 48) and label.shape == (48, 48)
    with_photo = build_train_dataset(cfg("transforms.train.photometric_distortion=true"))
    assert any(isinstance(t, PhotoMetricDistortion) for t in with_photo.transforms.transforms)


def test_eval_fields():
    s = inference_settings(cfg("eval.mode=whole", "eval.crop_size=40", "eval.stride=20", "eval.crop_batch_size=3"))
    assert s.mode is InferenceMode.WHOLE and s.crop_size == (40, 40) and s.stride == (20, 20)
    assert s.crop_batch_size == 3 and s.tta_ratios == (1.0,) and not s.use_flip
    tta = inference_settings(cfg("eval.use_tta=true", "transforms.eval.tta_ratios=[0.5,1.0,1.5]"))
    assert tta.tta_ratios == (0.5, 1.0, 1.5) and tta.use_flip


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_precision_sets_the_autocast_dtype(name, dtype):
    c = cfg(f"precision={name}")
    assert build_model(c, 5).autocast_dtype == Precision(c.precision).dtype == dtype


def test_adapter_fields():
    base = ["decoder_head.type=m2f", "decoder_head.hidden_dim=32", "decoder_head.m2f.num_queries=4",
            "decoder_head.m2f.nheads=2", "decoder_head.m2f.dim_feedforward=32", "decoder_head.m2f.enc_layers=1",
            "decoder_head.m2f.dec_layers=1", "decoder_head.m2f.pixel_decoder_nheads=2",
            "decoder_head.backbone_out_layers=FOUR_EVEN_INTERVALS"]
    a = "decoder_head.m2f.adapter."
    model = build_model(cfg(*base, a + "conv_inplane=8", a + "n_points=2", a + "deform_num_heads=4",
                            a + "drop_path_rate=0.1", a + "cffn_ratio=0.5", a + "deform_ratio=0.25",
                            a + "with_cp=false"), 5)
    sd = model.state_dict()
    p = "segmentation_model.0."
    assert sd[p + "spm.stem.0.weight"].shape[0] == 8  # conv_inplane
    # sampling offsets: heads x levels(1) x points x 2; value projection: deform_ratio * embed_dim
    assert sd[p + "interactions.0.extractor.attn.sampling_offsets.weight"].shape[0] == 4 * 1 * 2 * 2
    assert sd[p + "interactions.0.extractor.attn.value_proj.weight"].shape[0] == 8
    assert sd[p + "interactions.0.extractor.ffn.fc1.weight"].shape[0] == 16  # cffn_ratio * 32
    extractor = model.segmentation_model[0].interactions[0].extractor
    assert extractor.drop_path.drop_prob == 0.1 and extractor.with_cp is False
    lean = build_model(cfg(*base, a + "with_cffn=false", a + "use_extra_extractor=false"), 5).state_dict()
    assert not any(".ffn." in k for k in lean) and not any("extra_extractors" in k for k in lean)
    assert any("extra_extractors" in k for k in sd)


def test_finetune_fields():
    """`model.finetune.*` (the same section in every task): what trains, its learning rates, checkpointing."""
    from dinoseg.layers.lora import LoRALinear
    from dinoseg.models.frozen import adaptation_of

    def backbone_of(*overrides):
        model = build_model(cfg(*overrides), 3)
        return model, model.segmentation_model[0].feature_model

    _, frozen = backbone_of("model.finetune.mode=frozen", "model.finetune.lora_rank=2")
    assert adaptation_of(frozen) is None and not any(p.requires_grad for p in frozen.parameters())
    # mode, lora_rank, lora_alpha, lora_targets (null: qkv and proj on a ViT)
    _, lora = backbone_of("model.finetune.mode=lora", "model.finetune.lora_rank=3", "model.finetune.lora_alpha=6")
    adapted = {n for n, m in lora.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"blocks.{i}.attn.{t}" for i in range(4) for t in ("qkv", "proj")}
    qkv = lora.blocks[0].attn.qkv
    assert qkv.lora_A.shape == (3, 32) and qkv.lora_B.shape == (96, 3) and qkv.scaling == 2.0
    _, mlp = backbone_of("model.finetune.mode=lora", "model.finetune.lora_targets=[fc1,fc2]")
    assert {n for n, m in mlp.named_modules() if isinstance(m, LoRALinear)} == {
        f"blocks.{i}.mlp.{t}" for i in range(4) for t in ("fc1", "fc2")}
    # blocks: the last N blocks the head reads train (LAST: block 3); gradient_checkpointing on those
    _, blocks = backbone_of("model.finetune.mode=blocks", "model.finetune.blocks=2",
                            "model.finetune.gradient_checkpointing=true")
    assert {n.split(".")[1] for n, p in blocks.named_parameters() if p.requires_grad} == {"2", "3"}
    assert [b.gradient_checkpointing for b in blocks.blocks] == [False, False, True, True]
    _, early = backbone_of("model.finetune.mode=blocks", "model.finetune.blocks=1",
                           "decoder_head.backbone_out_layers=FOUR_EVEN_INTERVALS")
    assert {n.split(".")[1] for n, p in early.named_parameters() if p.requires_grad} == {"3"}
    # lr_multiplier and layer_decay: the adapted tensors' learning rates relative to the head's
    overrides = ("model.finetune.mode=blocks", "model.finetune.blocks=2", "model.finetune.lr_multiplier=0.2",
                 "model.finetune.layer_decay=0.5", "optimizer.lr=0.1")
    model, _ = backbone_of(*overrides)
    groups = build_optimizer(model, cfg(*overrides)).param_groups
    head = {id(p) for p in model.segmentation_model[1].parameters()}
    assert {id(p) for p in groups[0]["params"]} == head and groups[0]["lr"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups[1:]:
        for p in group["params"]:
            block = int(names[id(p)].split(".")[4])  # segmentation_model.0.feature_model.blocks.<i>
            assert group["lr"] == pytest.approx(0.1 * 0.2 * 0.5 ** (4 - block)), names[id(p)]
            assert group["weight_decay"] == (1e-3 if p.ndim >= 2 else 0.0)
    assert {names[id(p)].split(".")[4] for g in groups[1:] for p in g["params"]} == {"2", "3"}


def test_finetune_on_a_convnext_adapts_its_pointwise_convolutions():
    from dinoseg.layers.lora import LoRALinear

    convnext = ["model.dino_hub=dinov3_convnext_tiny", "model.backbone_kwargs={depths: [1, 1, 1, 1], dims: [8, 8, 8, 8]}",
                "model.random_init=true", "decoder_head.backbone_out_layers=FOUR_LAST"]
    model = build_model(load_config([], [*TINY, *convnext, "model.finetune.mode=lora"]), 3)
    backbone = model.segmentation_model[0].feature_model
    assert {n for n, m in backbone.named_modules() if isinstance(m, LoRALinear)} == {
        f"stages.{i}.0.{t}" for i in range(4) for t in ("pwconv1", "pwconv2")}
    blocks = build_model(load_config([], [*TINY, *convnext, "model.finetune.mode=blocks", "model.finetune.blocks=1"]), 3)
    trains = {n.split(".")[:2][1] for n, p in blocks.segmentation_model[0].feature_model.named_parameters()
              if p.requires_grad}
    assert trains == {"3"}  # the last stage with its downsampling layer
    with pytest.raises(ConfigError, match=r"^model.finetune.lora_targets=\['qkv', 'proj'\]: 'qkv' matches no linear "
                                          r"layer of this ConvNeXt's blocks; they are pwconv1, pwconv2$"):
        build_model(load_config([], [*TINY, *convnext, "model.finetune.mode=lora", "model.finetune.lora_targets=[qkv,proj]"]), 3)


@pytest.mark.parametrize("override,message", [
    ("model.finetune.mode=full", r"model.finetune.mode='full': expected one of \['frozen', 'lora', 'blocks'\]"),
    ("model.finetune.lora_rank=0", "model.finetune.lora_rank=0: must be >= 1"),
    ("model.finetune.lora_alpha=0", "model.finetune.lora_alpha=0.0: must be a finite number > 0"),
    ("model.finetune.lora_targets=[]", r"model.finetune.lora_targets=\[\]: expected a non-empty list of layer names"),
    ("model.finetune.lora_targets=[qkv,qkv]", r"model.finetune.lora_targets=\['qkv', 'qkv'\]: expected a non-empty list"),
    ("model.finetune.blocks=0", "model.finetune.blocks=0: must be >= 1"),
    ("model.finetune.lr_multiplier=0", "model.finetune.lr_multiplier=0.0: must be a finite number > 0"),
    ("model.finetune.layer_decay=1.5", r"model.finetune.layer_decay=1.5: must be in \(0, 1\]"),
    ("model.finetune.layer_decay=0", r"model.finetune.layer_decay=0.0: must be in \(0, 1\]"),
    ("model.finetune.rank=4", "model.finetune.rank: Key 'rank' not in 'FinetuneConfig'"),
])
def test_finetune_values_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=f"^{message}") as e:
        cfg(override)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,message", [
    (["model.finetune.lora_targets=[qkv,nope]"],
     r"model.finetune.lora_targets=\['qkv', 'nope'\]: 'nope' matches no linear layer of this DinoVisionTransformer's "
     r"blocks; they are fc1, fc2, proj, qkv"),
    (["model.finetune.mode=blocks", "model.finetune.blocks=5"],
     r"model.finetune.blocks=5: must be an integer in \[1, 4\]: this backbone has 4 blocks"),
])
def test_finetune_values_the_backbone_cannot_take_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        build_model(cfg("model.finetune.mode=lora", *overrides), 3)
