#!/usr/bin/env bash
# The CUDA checks of dinoseg in one call of a GPU machine (issue 16): the 7B segmentor's memory with float32 and
# bfloat16 weights under the official protocol, sliding-window overhead over the bare model (ViT-L/16, bfloat16),
# the Mask2Former training step's parts with and without the deterministic mode, and the CUDA tests.
#   bash benchmarks/cuda_check.sh            (omegaconf, if missing, from wheels in .whl/)
# Logs go to $OUT (or /tmp/dinoseg-cuda) and each step has its own time limit, so one slow step loses only itself.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dinoseg-cuda}
mkdir -p "$OUT"
if ! python3 -c "import omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"

step() {  # name, seconds, command...   (STEPS="big_model cuda_tests" runs only those)
  local name=$1 limit=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc in $((SECONDS - start)) s"
}

step big_model 150 python3 benchmarks/big_model_memory.py --device cuda --warmup
step slide 100 python3 benchmarks/slide_inference.py --device cuda --arch dinov3_vitl16 --precision bfloat16 \
  --sizes 512x683,1024x2048 --repeats 10 --min-seconds 5 --profile
M2F_VITL="model.dino_hub=dinov3_vitl16 model.backbone_kwargs={} decoder_head.hidden_dim=256 decoder_head.m2f.num_queries=100
  decoder_head.m2f.nheads=8 decoder_head.m2f.dim_feedforward=2048 decoder_head.m2f.enc_layers=6 decoder_head.m2f.dec_layers=9
  decoder_head.m2f.pixel_decoder_nheads=8 decoder_head.m2f.adapter.deform_num_heads=16 decoder_head.m2f.adapter.with_cp=false
  datasets.train=Synthetic:split=TRAIN:num_samples=16:image_size=512 transforms.train.img_size=512
  transforms.train.crop_size=512 train.batch_size=8 train.m2f_loss.train_num_points=12544"
# shellcheck disable=SC2086
step m2f_train 90 python3 benchmarks/m2f_train_step.py --device cuda --precisions bfloat16 --iters 5 --warmup 2 $M2F_VITL
# shellcheck disable=SC2086
step m2f_train_deterministic 90 python3 benchmarks/m2f_train_step.py --device cuda --precisions bfloat16 --iters 5 \
  --warmup 2 $M2F_VITL train.deterministic=true
step cuda_tests 200 python3 -m pytest -v -x -p no:cacheprovider tests/test_cuda.py
