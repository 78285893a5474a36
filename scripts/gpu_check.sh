#!/usr/bin/env bash
# One prepared GPU check for a lent machine (python3 there holds a CUDA torch and transformers):
# CUDA tests of the model and trainer, the GPU decode path (static cache + CUDA graph: quarter and full
# AR tokens/s at batch 1 and 16 in bf16), then the benchmark's GPU mode for RTF, GQA and training
# tokens/s. Writes logs and JSON to $OUT. ~8 minutes on an H100; every stage has its own timeout.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   bash scripts/gpu_check.sh --device cpu    # dry run of the same stages on the CPU (tiny sizes)
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE=cuda
[ "${1:-}" = "--device" ] && DEVICE="${2:-cuda}"
if [ "$DEVICE" = cpu ]; then
    echo "dry run on the CPU" | tee "$OUT/device.txt"
    "$PY" benchmarks/gpu_decode.py --device cpu --dtype float32 --presets tiny --batches 1,2 --tokens 20 --repeats 1 \
        --no-compile --out "$OUT/gpu_decode.json" 2>&1 | tail -5 | tee "$OUT/gpu_decode.log"
    "$PY" -m pytest -p no:cacheprovider -q tests/test_static_decode.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
    exit 0
fi
nvidia-smi -L | tee "$OUT/device.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
timeout 240 "$PY" -m pytest -p no:cacheprovider -q -s tests/test_gpu.py tests/test_train.py tests/test_static_decode.py \
    -k "cuda or gpu or static" 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "step/s" | tail -15
# AR tokens/s through the dynamic, static and static + CUDA graph paths (bf16, batch 1 and 16), then the
# cost of a Medusa verification pass (a chain and three trees) against a step (medusa_verify)
timeout 360 "$PY" benchmarks/gpu_decode.py --device cuda --dtype bfloat16 --presets quarter,full --batches 1,16 \
    --tokens 400 --out "$OUT/gpu_decode.json" 2>&1 | tail -8 | tee "$OUT/gpu_decode.log"
# RTF (e2e, with the compiled static path as its `compile` row), GQA at batch 16, training tokens/s and memory
if [ -f benchmarks/run.py ]; then
    timeout 300 "$PY" benchmarks/run.py --device cuda --dtype bfloat16 --quick --threads 8 --codec encodec \
        --sections e2e,gqa,train --out "$OUT/bench_gpu.json" 2>&1 | tail -60 | tee "$OUT/bench_gpu.log"
fi
