#!/usr/bin/env bash
# Engine and adapter benchmarks on one NVIDIA GPU, written for an H200 machine with no
# internet: python3 3.12 with torch, transformers and peft, but no bitsandbytes. It
# installs bitsandbytes from a wheel carried in .whl/ (nothing else, nothing from the
# internet), builds a randomly initialised Llama-3-8B-shaped model in NF4 on the GPU (speed
# does not depend on the weights' values) and prints the tables; about 8 minutes.
#
# Fetch the wheel beforehand on a machine with PyPI access, in the repo root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# then run `bash bench/gpu.sh` in the repo root there (.whl/ travels with the tree).
#
# After the engine and adapter tables, bench.lora_backends compares the Triton LoRA backend
# (with the Triton paged attention) with the compiled one and the bare base for 1, 8, 32,
# 128 and 1,000 rank-16 adapters (about 8 more minutes).
#
#   bash bench/gpu.sh --dry-run [--results-dir DIR]
# runs that same comparison script on the CPU instead, on a tiny random model, the Triton
# kernels through Triton's interpreter (CI: tests/test_bench.py): it proves the script
# works, its numbers mean nothing. $PYTHON (default .venv/bin/python, else python3) runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--dry-run" ]; then
    shift
    python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    exec "$python" -m bench.lora_backends --dry-run "$@"
fi

if ! python3 -c 'import bitsandbytes' 2>/dev/null; then
    wheels=(.whl/bitsandbytes-*.whl)
    if [ ! -f "${wheels[0]}" ]; then
        echo "bitsandbytes is not installed and no .whl/bitsandbytes-*.whl is here" >&2
        exit 2
    fi
    site=/tmp/loramux-bench-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The loramux namespace is spread over these folders (see pyproject.toml); no install.
export PYTHONPATH="$PWD:$PWD/core:$PWD/server:$PWD/trainer:$PWD/clients/python:$PYTHONPATH"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import torch, transformers, peft, bitsandbytes as b
print("torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "bitsandbytes", b.__version__)'
timeout 470 python3 -m bench.run_all --gpu
exec timeout 540 python3 -m bench.lora_backends --model llama3-8b-random --device cuda
