#!/bin/bash
# The depth task on a CUDA machine: its CLI tests (training, exact resume, eval, predict run on CUDA when it is
# there), float16 (gradient scaler) and bfloat16 training, and the demo's numbers and time.
#   bash benchmarks/depth_task_device_check.sh [output folder for the logs]
# Needs torch (CUDA), omegaconf, pytest and hypothesis.
out=${1:-${OUT:-/tmp/depth_device}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_depth_train.py tests/test_depth_config_effects.py \
    tests/test_depth_eval.py tests/test_schedulers.py > "$out/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E " "$out/pytest.log" | head -40
for p in float16 bfloat16; do
    python3 -m dinoseg.cli train demo_depth.yaml output_dir="$out/$p" overwrite_output_dir=true precision=$p \
        scheduler.total_iter=200 eval.eval_interval=100 train.checkpoint_interval=100 > "$out/$p.log" 2>&1
    echo "$p rc=$?"; grep -aE "dinoseg: error|iteration (100|200):" "$out/$p.log" | tail -3
done
start=$(date +%s)
python3 -m dinoseg.cli demo demo_depth.yaml output_dir="$out/demo" overwrite_output_dir=true > "$out/demo.log" 2>&1
echo "demo rc=$? seconds=$(( $(date +%s) - start ))"; grep -aE "trained head|mean depth|dinoseg: error" "$out/demo.log"
