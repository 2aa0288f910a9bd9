#!/usr/bin/env bash
# Builds kubetune's three images here with podman (`make images`), on the local Debian base of
# images/base.sh: no container registry is reachable, so no base image can be pulled.
#
#   images/build.sh                     # operator, serving and trainer
#   images/build.sh operator trainer    # some of them
#
# Tags are what the Helm chart's defaults point at: <registry>/<name>:<Chart appVersion>
# (ghcr.io/kubetune/trainer:0.1.0 ...). Python packages come from PyPI (torch too: PyPI's torch is a
# CUDA build, download.pytorch.org being unreachable here). Builds mount two things that stay out
# of the images: the machine's CA bundle (the only one PyPI answers with here) and uv's wheel cache.
# Settings: KUBETUNE_IMAGE_REGISTRY (ghcr.io/kubetune), KUBETUNE_TORCH_INDEX_URL (https://pypi.org/simple),
# KUBETUNE_CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt), UV_CACHE_DIR (~/.cache/uv), KUBETUNE_REVISION.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in podman:podman buildah:buildah mmdebstrap:mmdebstrap runc:runc skopeo:skopeo; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "Installing ${need[*]} (apt)" >&2
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' helm/kubetune/Chart.yaml)
registry=${KUBETUNE_IMAGE_REGISTRY:-ghcr.io/kubetune}
ca=${KUBETUNE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
uv_cache=${UV_CACHE_DIR:-$HOME/.cache/uv}
mkdir -p "$uv_cache"
base=$(images/base.sh)

# images/common.sh: the OCI runtime and rlimits that work here (the tests use them too)
. images/common.sh

declare -A dockerfile=([operator]=operator/Dockerfile [serving]=serving/Dockerfile [trainer]=trainer-image/Dockerfile)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(operator serving trainer)
report=()
for name in "${names[@]}"; do
  file=${dockerfile[$name]:?"unknown image $name (operator, serving or trainer)"}
  ref=$registry/$name:$version
  echo "Building $ref from $file on $base" >&2
  torch_arg=()  # the operator has no torch
  [ "$name" = operator ] || torch_arg=(--build-arg TORCH_INDEX_URL="${KUBETUNE_TORCH_INDEX_URL:-https://pypi.org/simple}")
  start=$(date +%s)
  flags=("${KUBETUNE_PODMAN_RUN_FLAGS[@]}" --network host --layers --file "$file"
    --build-arg BASE_IMAGE="$base" "${torch_arg[@]}"
    --build-arg UV_NO_CACHE=0 --build-arg VERSION="$version" --build-arg REVISION="${KUBETUNE_REVISION:-unknown}"
    --volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro" --volume "$uv_cache:/root/.cache/uv")
  # The `build` stage gets a tag of its own, so that its layers stay cached for the next run
  # (untagged, they would count as dangling) and the ones an older run left become dangling.
  podman build "${flags[@]}" --target build --tag "localhost/kubetune-build/$name:$version" . >&2
  podman build "${flags[@]}" --tag "$ref" . >&2
  # Layers of earlier builds of this image: several GB each. (Never run two `make images` at once.)
  podman image prune --force >/dev/null
  seconds=$(( $(date +%s) - start ))
  size=$(podman image inspect --format '{{.Size}}' "$ref")
  report+=("$(printf '%-40s %6d MB  (built in %ds)' "$ref" $((size / 1000000)) "$seconds")")
done
printf '%s\n' "${report[@]}"
