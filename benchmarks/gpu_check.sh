#!/usr/bin/env bash
# The GPU numbers README lacks, from one command on one CUDA GPU, in under 8 minutes:
#   1. the inference table (benchmarks/inference.py) at batch 64 and 256;
#   2. fine-tuning img/s, ours vs timm, bf16 autocast + channels_last, eager and torch.compile (benchmarks/train.py);
#   3. FCMAE forward+backward img/s and peak memory, dense / dense channels_last / sparse, Tiny and Base
#      (benchmarks/fcmae.py; fp32 with TF32, as the trainer runs the FCMAE recipe on GPUs);
#   4. data-loader img/s per worker and the workers a GPU needs (benchmarks/data.py).
#
#   bash benchmarks/gpu_check.sh                      # on a machine with a CUDA GPU
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh    # CPU, atto at 64 px: checks that every step runs
#
# Each step has its own time limit (the sum stays under 8 minutes); a step that runs out or fails says
# so and the script goes on to the next, so one slow compile cannot cost the other numbers. The exit
# status is the number of steps that did not finish.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
failed=0

step() {  # step SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    echo
    echo "=== $title (limit ${limit} s) ==="
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "!!! $title: stopped at its ${limit} s limit"
        failed=$((failed + 1))
    elif [ $rc -ne 0 ]; then
        echo "!!! $title: failed (exit $rc)"
        failed=$((failed + 1))
    fi
    echo "--- $title: $((SECONDS - start)) s"
}

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    echo "SMOKE RUN on the CPU with tiny sizes: checks the commands, measures nothing worth keeping"
    INFER=(--device cpu --quick)
    BS1=4; BS2=8
    TRAIN=(--device cpu --variant atto --resolution 64 --batch-size 4 --steps 1 --warmup 1)
    FCMAE_T=(--device cpu --variant atto --size 64 --batch-size 2 --steps 1 --warmup 0)
    FCMAE_B=(--device cpu --variant atto --size 64 --batch-size 4 --steps 1 --warmup 0)
    DATA=(--device cpu --quick --workers 0,1)
    LIMIT_INFER=900; LIMIT_TRAIN=600; LIMIT_COMPILE=900; LIMIT_FCMAE=600; LIMIT_DATA=600  # a busy shared CPU
else
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "no CUDA device visible to torch; GPU_CHECK_SMOKE=1 runs the steps on the CPU"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    INFER=(--device cuda --repeats 5)
    BS1=64; BS2=256
    TRAIN=(--device cuda --variant tiny --batch-size 128 --steps 10 --warmup 3)
    FCMAE_T=(--device cuda --variant tiny --batch-size 128 --steps 5 --warmup 2 --tf32)
    FCMAE_B=(--device cuda --variant base --batch-size 64 --steps 5 --warmup 2 --tf32)
    DATA=(--device cuda --workers 1,4,8)
    LIMIT_INFER=115; LIMIT_TRAIN=35; LIMIT_COMPILE=90; LIMIT_FCMAE=35; LIMIT_DATA=30  # 455 s in all
fi

step $LIMIT_INFER "inference, batch $BS1" $PY benchmarks/inference.py "${INFER[@]}" --batch-size $BS1
step $LIMIT_INFER "inference, batch $BS2" $PY benchmarks/inference.py "${INFER[@]}" --batch-size $BS2
step $LIMIT_TRAIN "fine-tuning step, bf16 + channels_last, eager" $PY benchmarks/train.py "${TRAIN[@]}" --amp --channels-last
step $LIMIT_COMPILE "fine-tuning step, bf16 + channels_last, torch.compile" $PY benchmarks/train.py "${TRAIN[@]}" --amp --channels-last --compile
step $LIMIT_FCMAE "FCMAE dense / dense channels_last / sparse, Tiny" $PY benchmarks/fcmae.py "${FCMAE_T[@]}"
step $LIMIT_FCMAE "FCMAE dense / dense channels_last / sparse, Base" $PY benchmarks/fcmae.py "${FCMAE_B[@]}"
step $LIMIT_DATA "data loading" $PY benchmarks/data.py "${DATA[@]}"
echo
echo "steps that did not finish: $failed"
exit $failed
