import dinoseg


def test_official_public_names_are_importable_from_the_top_level():
    official = ["build_segmentation_decoder", "BackboneLayersSet", "ModelWithIntermediateLayers", "slide_inference",
                "make_inference", "MultiSegmentationLoss", "calculate_intersect_and_union", "DinoVisionTransformer",
                "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16plus",
                "dinov3_vith16plus", "dinov3_vit7b16", "dinov3_vit7b16_ms", "DINOv3_Adapter", "Mask2FormerHead"]
    for name in official:
        assert name in dinoseg.__all__ and callable(getattr(dinoseg, name)), name
    assert set(dinoseg.__all__) <= set(dir(dinoseg))


def test_depth_names_are_importable_from_the_top_level_and_their_official_paths():
    from dinoseg.eval.depth import config, eval, loss, metrics, models, transforms, utils
    from dinoseg.eval.depth.datasets import datasets_utils
    from dinoseg.eval.depth.models import dpt_head, linear_head

    official = {
        "DepthConfig": config, "make_depther_from_config": models, "build_depther": models, "Depther": models,
        "FeaturesToDepth": models, "DPTHead": dpt_head, "PatchSizeAdaptationStrategy": models, "LossType": loss,
        "SigLoss": loss, "GradientLoss": loss, "GradientLogLoss": loss, "L1Loss": loss, "MultiLoss": loss,
        "DEPTH_METRICS": metrics, "calculate_depth_metrics": metrics, "make_valid_mask": datasets_utils,
        "align_depth_least_square": utils, "make_depth_eval_transforms": transforms,
        "make_depth_train_transforms": transforms, "evaluate_depther_with_dataloader": eval,
        "evaluate_depther_with_config": eval, "NYU": None, "KITTI": None, "DepthFolder": None, "SyntheticDepth": None,
        "dinov3_vit7b16_dd": None, "dinov3_vitl16_chmv2": None,
    }
    for name, module in official.items():
        assert name in dinoseg.__all__, name
        if module is not None:
            assert getattr(dinoseg, name) is getattr(module, name), name
    # Names both tasks have: segmentation's at the top level, depth's at the official depth paths.
    assert dinoseg.DepthDecoderConfig is models.DecoderConfig and "DecoderConfig" not in dinoseg.__all__
    assert dinoseg.LinearHead.__module__.startswith("dinoseg.eval.segmentation")
    assert linear_head.LinearHead is models.LinearHead and linear_head.LinearHead is not dinoseg.LinearHead
