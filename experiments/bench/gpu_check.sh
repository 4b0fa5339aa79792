#!/usr/bin/env bash
# The GPU check of issue #9, one short script: bf16 training MFU at model=1b, sequence 4096, and
# greedy generation tokens/s, ours next to transformers' LlamaForCausalLM with the same weights.
#
#   bash experiments/bench/gpu_check.sh                      # on a machine with one CUDA GPU
#   SIZE=tiny SEQ=256 DEVICE=cpu DTYPE=float32 bash experiments/bench/gpu_check.sh   # dry run
#
# MFU is against the GPU's datasheet bf16 peak (llamalab.perf.datasheet_peak_flops: H100 SXM and
# H200 989 TFLOP/s dense). About 3-5 minutes on an H100, most of it torch.compile's first
# compilation; output is tee'd into $OUT (default: the current directory) as gpu_check.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
SIZE="${SIZE:-1b}"
SEQ="${SEQ:-4096}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
PY="${PYTHON:-python}"
out="${OUT:-.}/gpu_check.txt"
{
  echo "== $(date -u +%FT%TZ) gpu_check: size $SIZE, seq $SEQ, $DTYPE on $DEVICE"
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; fi
  echo "== training step (batch 1), ours / transformers / ours compiled"
  "$PY" "$here/bench_model.py" --sizes "$SIZE" --seq "$SEQ" --batch 1 --dtype "$DTYPE" \
    --device "$DEVICE" --repeats 5 --compile
  echo "== greedy generation, 64 new tokens after a 32-token prompt"
  "$PY" "$here/bench_generate.py" --sizes "$SIZE" --batches 1,16,64 --dtype "$DTYPE" \
    --device "$DEVICE" --repeats 3 --compile
  echo "== tensor-parallel rollout engine, TP 1 on one device: equals plain generation"
  "$PY" "$here/tp_check.py" --size "${TP_SIZE:-small}" --device "$DEVICE" --dtype "$DTYPE"
} 2>&1 | tee "$out"
