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
set -euo pipefail
cd "$(dirname "$0")/.."

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
exec timeout 470 python3 -m bench.run_all --gpu
