"""Tiny depth runs for the task tests: the engine tests' tiny ViT on small synthetic depth scenes."""

from .engine_utils import TINY, run_args

BACKBONE = [item for item in TINY if item.startswith("model.")]

TINY_DEPTH = [
    "task=depth",
    "device=cpu",
    *BACKBONE,
    "datasets.train=SyntheticDepth:split=TRAIN:num_samples=32:image_size=64",
    "datasets.val=SyntheticDepth:split=VAL:num_samples=6:image_size=64",
    "decoder_head.backbone_out_layers=LAST",
    "decoder_head.n_output_channels=16",
    "decoder_head.use_batchnorm=true",
    "decoder_head.max_depth=10.0",
    "train.batch_size=4",
    "train.num_workers=0",
    "train.log_interval=5",
    "optimizer.lr=0.01",
    "scheduler.warmup_iters=2",
]


def tiny_depth(output_dir, total_iter=10, eval_interval=None, checkpoint_interval=5, extra=()):
    return run_args(TINY_DEPTH, output_dir, total_iter, eval_interval, checkpoint_interval, extra)
