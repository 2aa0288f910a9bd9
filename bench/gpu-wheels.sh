#!/usr/bin/env bash
# bench/gpu-wheels.sh [DIR]: the wheels bench/gpu.py needs that the accelerator machine lacks, for
# its Python (3.12, manylinux x86_64), into DIR (default .whl, ignored by git). That machine has
# torch 2.11, transformers, peft, accelerate, tokenizers, safetensors, pyarrow and triton; it lacks
# TRL, bitsandbytes, Liger's kernels, datasets (and its dill and multiprocess) and pydantic (which
# kubetune's API models use). The versions are this machine's (.venv), so both run the same code;
# liger-kernel is not installed here (CPU only): its newest release.
#
# Then, on the accelerator machine (the `run` tool, carrying DIR), from the repository's root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:operator:trainer-image HF_HUB_OFFLINE=1 python3 -m bench.gpu --write docs/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PY=.venv/bin/python
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
specs=()
for p in trl bitsandbytes datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection; do
  specs+=("$p==$(version "$p")")
done
specs+=(liger-kernel)
mkdir -p "$DIR"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d "$DIR" "${specs[@]}"
du -sh "$DIR"
ls "$DIR"
