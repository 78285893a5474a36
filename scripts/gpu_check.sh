#!/usr/bin/env bash
# One prepared GPU check for a lent machine (python3 there holds a CUDA torch and transformers):
# CUDA tests of the model and trainer, then the benchmark's GPU mode. Writes logs/JSON to $OUT.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
timeout 300 python3 -m pytest -p no:cacheprovider -q -s tests/test_gpu.py tests/test_train.py -k "cuda or gpu" 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "step/s"
if [ -f benchmarks/run.py ]; then
    timeout 240 python3 benchmarks/run.py --device cuda --dtype bfloat16 --quick --out "$OUT/bench_gpu.json" 2>&1 | tail -60 | tee "$OUT/bench_gpu.log"
fi
