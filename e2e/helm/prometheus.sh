#!/usr/bin/env bash
# e2e/helm/prometheus.sh — a real Prometheus (and promtool) for kubetune's monitoring tests.
#
#   e2e/helm/prometheus.sh install            make sure `prometheus` and `promtool` are on PATH
#   e2e/helm/prometheus.sh run DIR CONFIG PORT  start Prometheus on 127.0.0.1:PORT in the background,
#                                               storage and log in DIR, pid in DIR/prometheus.pid;
#                                               prints the base URL once it is ready
#   e2e/helm/prometheus.sh stop DIR           stop the Prometheus started with DIR
#
# `install` uses Debian's package (apt-get install prometheus, as root) when the binaries are
# missing. The package's post-install step would start a system service; a policy-rc.d that
# refuses every service start is put in place for the install and removed afterwards, so only
# the Prometheus that `run` starts (with the test's own config and a temporary storage folder)
# ever runs. Environment: PROMETHEUS_BIN, PROMTOOL_BIN to use other binaries.
set -euo pipefail

log() { echo "[prometheus.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

install() {
  if command -v "${PROMETHEUS_BIN:-prometheus}" >/dev/null && command -v "${PROMTOOL_BIN:-promtool}" >/dev/null; then
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "prometheus/promtool are missing and installing them needs root: sudo apt-get install -y prometheus"
  command -v apt-get >/dev/null || die "prometheus/promtool are missing and this is no Debian/Ubuntu: install Prometheus 2.x"
  local policy=/usr/sbin/policy-rc.d created=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created=1
  fi
  log "installing Debian's prometheus package (no service is started)"
  (
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }
  ) || { [[ $created == 1 ]] && rm -f "$policy"; die "apt-get install prometheus failed"; }
  [[ $created == 1 ]] && rm -f "$policy"
  # A service manager in the machine could still have started it: stop only that service.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
  fi
  command -v prometheus >/dev/null && command -v promtool >/dev/null || die "prometheus/promtool still missing"
}

run() {
  local dir="$1" config="$2" port="$3"
  install
  mkdir -p "$dir/data"
  "${PROMETHEUS_BIN:-prometheus}" \
    --config.file="$config" --storage.tsdb.path="$dir/data" \
    --web.listen-address="127.0.0.1:$port" --web.enable-lifecycle \
    --storage.tsdb.retention.time=1d --log.level=warn \
    >"$dir/prometheus.log" 2>&1 </dev/null &
  echo $! >"$dir/prometheus.pid"
  local url="http://127.0.0.1:$port"
  for _ in $(seq 120); do
    if curl -sf --max-time 1 "$url/-/ready" >/dev/null 2>&1; then echo "$url"; return 0; fi
    kill -0 "$(cat "$dir/prometheus.pid")" 2>/dev/null || { tail -n 20 "$dir/prometheus.log" >&2; die "prometheus exited"; }
    sleep 0.5
  done
  tail -n 20 "$dir/prometheus.log" >&2
  die "prometheus was not ready after 60s"
}

stop() {
  local f="$1/prometheus.pid" pid
  [[ -f $f ]] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null && grep -qa prometheus "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
  fi
  rm -f "$f"
}

case "${1:-}" in
  install) install ;;
  run) [[ $# == 4 ]] || die "usage: $0 run DIR CONFIG PORT"; run "$2" "$3" "$4" ;;
  stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) echo "usage: $0 install | run DIR CONFIG PORT | stop DIR" >&2; exit 2 ;;
esac
