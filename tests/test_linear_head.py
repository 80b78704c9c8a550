import copy

import pytest
import torch
from torch import nn

from dinoseg import DinoVisionTransformer
from dinoseg.eval.segmentation.models import BackboneLayersSet, FeatureDecoder, build_segmentation_decoder
from dinoseg.eval.segmentation.models.heads.linear_head import LinearHead

from .conftest import load_fixture

LINEAR_FIXTURES = [
    "linear_last_on_vit_mlp.pt",
    "linear_four_even_intervals_on_vit_mlp.pt",
    "linear_last_on_vit_swiglu_untied.pt",
    "linear_four_even_intervals_on_vit_swiglu_untied.pt",
]


def official_segmentor(official_index, name) -> tuple[FeatureDecoder, dict]:
    """Segmentor built like the fixture's, loaded strictly with the official backbone and head weights."""
    entry = official_index[name]
    backbone = DinoVisionTransformer(**official_index[entry["backbone"]]["official_kwargs"])
    segmentor = build_segmentation_decoder(
        backbone,
        entry["backbone_out_layers"],
        "linear",
        num_classes=entry["num_classes"],
        dropout=entry["dropout"],
        use_batchnorm=entry["use_batchnorm"],
        use_cls_token=entry["use_cls_token"],
    )
    ref = load_fixture(name)
    backbone_sd = load_fixture(entry["backbone"])["state_dict"]
    state = {f"segmentation_model.0.feature_model.{k}": v for k, v in backbone_sd.items()}
    state.update(ref["head_state_dict"])
    segmentor.load_state_dict(state, strict=True)
    return segmentor.eval(), ref


def tiny_backbone(depth=4):
    return DinoVisionTransformer(
        embed_dim=32, depth=depth, num_heads=2, n_storage_tokens=2, layerscale_init=1e-5
    )


@pytest.mark.parametrize("name", LINEAR_FIXTURES)
def test_predict_matches_official(official_index, name):
    segmentor, ref = official_segmentor(official_index, name)
    head_keys = {k for k in segmentor.state_dict() if k.startswith("segmentation_model.1.")}
    assert head_keys == set(ref["head_state_dict"])
    logits = segmentor.predict(ref["x"], rescale_to=ref["x"].shape[-2:])
    torch.testing.assert_close(logits, ref["predict_logits"], atol=1e-5, rtol=1e-5)


def test_layer_sets_pick_official_blocks():
    seg = build_segmentation_decoder(tiny_backbone(depth=8), "four_even_intervals", "linear", num_classes=3)
    assert seg.segmentation_model[0].n == [1, 3, 5, 7]
    assert seg.segmentation_model[1].channels == 4 * 32
    seg = build_segmentation_decoder(tiny_backbone(depth=8), BackboneLayersSet.LAST, "linear", num_classes=3)
    assert seg.segmentation_model[0].n == [7]


def test_training_forward_is_dropout_then_batchnorm_then_conv():
    torch.manual_seed(0)
    head = LinearHead([8, 8], n_output_channels=5, dropout=0.5).train()
    nn.init.normal_(head.conv.weight)
    feats = [torch.randn(3, 8, 4, 6), torch.randn(3, 8, 2, 3)]  # second map is resized to the first grid
    reference = copy.deepcopy(head)
    torch.manual_seed(1)
    out = head(feats)
    torch.manual_seed(1)
    x = torch.cat([feats[0], nn.functional.interpolate(feats[1], size=(4, 6), mode="bilinear")], dim=1)
    expected = reference.conv(reference.batchnorm_layer(reference.dropout(x)))
    torch.testing.assert_close(out, expected)
    assert out.shape == (3, 5, 4, 6)
    # Dropout really acts in training (whole channels are zeroed) and not in predict / eval.
    assert not torch.allclose(out, reference.conv(reference.batchnorm_layer(x)))
    head.eval()
    torch.testing.assert_close(head.predict(feats, rescale_to=(4, 6)), head.conv(head.batchnorm_layer(x)))


def test_cls_token_is_concatenated_per_layer():
    backbone = tiny_backbone()
    seg = build_segmentation_decoder(
        backbone, "FOUR_LAST", "linear", num_classes=4, use_cls_token=True
    ).eval()
    head = seg.segmentation_model[1]
    assert head.channels == 2 * 4 * 32
    x = torch.randn(2, 3, 32, 48)
    layers = seg.segmentation_model[0](x)
    feats = head._features(layers)
    for i, (patch, cls) in enumerate(layers):
        torch.testing.assert_close(feats[:, 64 * i : 64 * i + 32], patch)
        torch.testing.assert_close(
            feats[:, 64 * i + 32 : 64 * (i + 1)], cls[:, :, None, None].expand(-1, -1, 2, 3)
        )
    assert seg.predict(x, rescale_to=(32, 48)).shape == (2, 4, 32, 48)
    with pytest.raises(ValueError, match="class token"):
        head([p for p, _ in layers])


def test_without_batchnorm():
    seg = build_segmentation_decoder(tiny_backbone(), "LAST", "linear", num_classes=4, use_batchnorm=False)
    assert set(seg.segmentation_model[1].state_dict()) == {"conv.weight", "conv.bias"}
    assert seg.predict(torch.randn(1, 3, 32, 32), rescale_to=(40, 40)).shape == (1, 4, 40, 40)


def test_sync_batchnorm_conversion_keeps_official_keys():
    seg = build_segmentation_decoder(tiny_backbone(), "LAST", "linear", num_classes=4)
    keys = list(seg.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(seg)
    assert isinstance(converted.segmentation_model[1].batchnorm_layer, nn.SyncBatchNorm)
    assert list(converted.state_dict()) == keys


def test_only_the_head_trains_and_the_backbone_stays_in_eval():
    seg = build_segmentation_decoder(tiny_backbone(), "LAST", "linear", num_classes=4).train()
    assert not seg.segmentation_model[0].feature_model.training
    assert seg.segmentation_model[1].training
    assert all(not p.requires_grad for p in seg.segmentation_model[0].parameters())
    logits = seg(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4, 2, 2)
    logits.sum().backward()
    assert seg.segmentation_model[1].conv.weight.grad is not None


def test_cpu_autocast_follows_input_device():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    seg32 = build_segmentation_decoder(backbone, "LAST", "linear", num_classes=4).eval()
    seg16 = build_segmentation_decoder(
        backbone, "LAST", "linear", num_classes=4, autocast_dtype=torch.bfloat16
    )
    seg16.load_state_dict(seg32.state_dict())
    seg16.eval()
    x = torch.randn(1, 3, 32, 32)
    ref = seg32.predict(x, rescale_to=(32, 32))
    out = seg16.predict(x, rescale_to=(32, 32))
    assert ref.dtype == torch.float32 and out.dtype == torch.bfloat16  # autocast ran on the CPU
    torch.testing.assert_close(out.float(), ref, atol=5e-3, rtol=0.05)


def test_bad_arguments_raise():
    backbone = tiny_backbone()
    with pytest.raises(ValueError, match="decoder_type"):
        build_segmentation_decoder(backbone, "LAST", "fpn")
    with pytest.raises(ValueError, match="backbone_out_layers"):
        build_segmentation_decoder(backbone, "LAST_TWO", "linear")
    with pytest.raises(TypeError, match="num_queries"):
        build_segmentation_decoder(backbone, "LAST", "linear", num_queries=10)
    with pytest.raises(ValueError, match="feature maps"):
        LinearHead([8, 8], 3)([torch.randn(1, 8, 2, 2)])
