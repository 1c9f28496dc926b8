#!/usr/bin/env bash
# GPU checks (issue 7): on one CUDA GPU with TensorRT + cuda-python installed, in under 8 minutes:
#   1. the GPU-marked tests (TensorRT build of a tiny engine, greedy equality with the CPU path)
#   2. the planning tests
# NOT YET RUN: no machine available to us had TensorRT (NVIDIA's index is unreachable) and no GPU
# was lent to this task.  A per-step latency micro-benchmark (with/without CUDA graphs) belongs here
# once the TensorRT backend has run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import tensorrt, cuda.bindings; print('TensorRT', tensorrt.__version__)"
timeout 480 python3 -m pytest -q -ra -m "gpu or tensorrt" tests/test_gpu.py tests/test_tensorrt_plan.py
