#!/usr/bin/env bash
# The first hardware run of specrt's TensorRT path, in one call of about ten minutes, on a machine with an NVIDIA
# GPU, cuda-python, and TensorRT-RTX (`pip install 'specrt[tensorrt]'`) or TensorRT, after `make demo`:
#   0. the CPU halves: profile planning, real plan builds of tiny pairs, the backend with CUDA faked
#   1. the GPU tests: tiny pairs built for this GPU, greedy equality with ONNX Runtime on the CPU, CUDA-graph
#      replays counted, replayed logits equal to eager ones, the plans' tensor types
#   2. the demo pair: its plans built here (`make build-trt`: a bucketed export, every static k profile), greedy
#      speculative decoding through them checked token for token against ONNX Runtime on the CPU, and the
#      per-pass latency by k with and without CUDA graphs (benchmarks/trt_steps.py)
# NEVER RUN: no GPU was lent to the tasks that wrote it, and the lent device machine cannot hold TensorRT
# (docs/gpu.md says why).  Each step prints what it found; the first failure stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'PY'
from specrt.runtime import tensorrt_lib
from specrt.export.tensorrt_build import local_gpu
lib = tensorrt_lib.load()
print(f"{lib.flavour} {lib.version}; GPU compute capability: {local_gpu()}")
PY
timeout 300 python3 -m pytest -q -ra tests/test_tensorrt_plan.py tests/test_tensorrt_build.py tests/test_backend.py
timeout 300 python3 -m pytest -q -ra -m "gpu or tensorrt" tests/test_gpu.py
if [ -f .cache/demo/verifier-hf/config.json ]; then
  timeout 600 make --no-print-directory build-trt
  timeout 300 python3 benchmarks/trt_steps.py .cache/demo/engine-trt --repeats 20
else
  echo "skipping the demo pair: run 'make demo' first"
fi
