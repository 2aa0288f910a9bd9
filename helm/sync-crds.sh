#!/usr/bin/env bash
# helm/sync-crds.sh — copy the CRDs into the chart, which renders them from files/crds/.
#
#   helm/sync-crds.sh            copy crds/*.yaml and kopf's peering CRDs into helm/kubetune/files/crds/
#   helm/sync-crds.sh --check    exit 1 (naming the files) when the chart's copies differ
#
# A chart cannot read files outside its folder, and a symlink out of it breaks `helm package`
# and GitOps tools that fetch the chart alone, so the chart keeps byte-for-byte copies;
# tests/helm/test_helm_chart_crds.py fails when they drift. Run this after `kubetune crds`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/helm/kubetune/files/crds"
declare -A SOURCES=()
for f in "$ROOT"/crds/*.yaml; do SOURCES["$(basename "$f")"]="$f"; done
SOURCES["kopf.dev_peerings.yaml"]="$ROOT/e2e/operator/peering-crds.yaml"

if [[ "${1:-}" == "--check" ]]; then
  stale=()
  for name in "${!SOURCES[@]}"; do cmp -s "${SOURCES[$name]}" "$DEST/$name" || stale+=("$name"); done
  for f in "$DEST"/*.yaml; do [[ -n "${SOURCES[$(basename "$f")]+x}" ]] || stale+=("$(basename "$f") (no source)"); done
  if ((${#stale[@]})); then
    echo "helm/kubetune/files/crds differs from its sources: ${stale[*]}; run helm/sync-crds.sh" >&2
    exit 1
  fi
  echo "helm/kubetune/files/crds matches crds/ and e2e/operator/peering-crds.yaml"
  exit 0
fi

mkdir -p "$DEST"
for f in "$DEST"/*.yaml; do [[ -e "$f" && -z "${SOURCES[$(basename "$f")]+x}" ]] && rm -f "$f"; done
for name in "${!SOURCES[@]}"; do cp "${SOURCES[$name]}" "$DEST/$name"; done
echo "Synced ${#SOURCES[@]} CRD files into $DEST"
