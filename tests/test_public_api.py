import dinoseg


def test_official_public_names_are_importable_from_the_top_level():
    official = ["build_segmentation_decoder", "BackboneLayersSet", "ModelWithIntermediateLayers", "slide_inference",
                "make_inference", "MultiSegmentationLoss", "calculate_intersect_and_union", "DinoVisionTransformer",
                "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16plus",
                "dinov3_vith16plus", "dinov3_vit7b16", "dinov3_vit7b16_ms", "DINOv3_Adapter", "Mask2FormerHead"]
    for name in official:
        assert name in dinoseg.__all__ and callable(getattr(dinoseg, name)), name
    assert set(dinoseg.__all__) <= set(dir(dinoseg))
