#!/usr/bin/env bash
# The checks that need the GPU machine, in one short run (docs/deployment.md):
# the AVX-512 kernel parity tests (its CPU has AVX-512), every detector on CUDA
# (float32, float16/bfloat16 autocast, fit on CUDA, the kernels' torch-CUDA paths,
# ONNX Runtime's CUDA provider when onnxruntime-gpu is installed), and the bottle
# figures of bench/cuda_bottle.py. Output: $OUT (default ./gpu-check) logs + JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
python -m pyad info | tee "$out/info.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.csv"
PYAD_ISA=avx512 python -m pyad info >"$out/info_avx512.json"
PYAD_ISA=avx512 python -m pytest -q -p no:cacheprovider tests/test_gaussian.py tests/test_coreset.py \
  tests/test_pooling.py tests/test_backend.py 2>&1 | tail -n 5 | tee "$out/avx512.txt"
python -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tail -n 40 | tee "$out/cuda_tests.txt"
if [ -d ../shared/data/mvtec_ad/bottle ]; then
  python bench/cuda_bottle.py PatchCore PaDiM | tee "$out/cuda_bottle.jsonl"
fi
