"""The operator at scale, on the local control plane, against the training-operator alone.

    .venv/bin/python -m bench.operator_scale --n 100 --n 300 --write docs/benchmarks.md

For each N, on a fresh local cluster (e2e/cluster/up: kube-apiserver, etcd, scheduler,
controller-manager, the Kubeflow training-operator; KWOK plays the pods, which succeed
after 2 s):
1. direct: N PyTorchJobs applied at once to the training-operator alone (no kubetune running);
2. kubetune: N one-stage FineTuneJobs applied at once, `kubetune operator` running
   (standalone, as a ServiceAccount); they render the same PyTorchJobs;
3. hand-off: N two-stage FineTuneJobs applied at once;
4. steady state (`--steady SECONDS`): N one-stage FineTuneJobs whose pods KWOK keeps Running,
   left alone for that long once every PyTorchJob runs (nothing but the operator's timer and
   the training-operator's own status writes wake them).
Figures: seconds until all succeed in 1 and 2, and their ratio (1.0: kubetune costs no
throughput); FineTuneJob created -> its PyTorchJob created, p50/p95; stage hand-off (stage 1's
PyTorchJob Succeeded -> stage 2's created), p50/p95; the operator's peak RSS and CPU seconds;
the operator's API requests per reconcile, of phases 2 and 3 and apart of the steady state: all
of them (the API server's APF counter of the `service-accounts` flow schema, which only the
operator's ServiceAccount falls in here) and its handlers' own (`kubetune_api_requests_total`).
Times are when this process saw each event on its watches, so they include watch delivery, the
same for both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch

from bench import machine, write_section
from e2e.accounts import service_account_kubeconfig

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "e2e" / "cluster"
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
FTJ = ("kubetune.io", "v1alpha1", "finetunejobs")
PJ = ("kubeflow.org", "v1", "pytorchjobs")
OPERATOR_FLOW_SCHEMA = "service-accounts"
TRAINING_OPERATOR_USER = "training-operator"  # its client certificate's CN (e2e/cluster/up)
OPERATOR_USER = "system:serviceaccount:kubetune-bench-system:kubetune"  # operator_kubeconfig's
CREATE_THREADS = 8
TRIGGERS = ("change", "child", "timer")  # what woke a reconcile (kubetune_reconciles_total's label)
HOLD = {"kwok.kubetune.io/delay": "30m"}  # pod annotations: KWOK keeps the pod Running (e2e/cluster/kwok-stages.yaml)


# --- what is applied ------------------------------------------------------------------------


def finetunejob(name: str, stages: int, pod_annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A FineTuneJob of `stages` SFT stages on CPU-less fake pods (no GPUs: node capacity is
    pods, not cards, so the figures are the controllers', not the scheduler's bin packing);
    `pod_annotations`: copied onto its pods (kubetune.io/pod-annotations)."""
    from kubetune.backends import POD_ANNOTATIONS

    meta: dict[str, Any] = {"name": name}
    if pod_annotations:
        meta["annotations"] = {POD_ANNOTATIONS: json.dumps(pod_annotations)}
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": meta,
        "spec": {
            "model": {"uri": "hf://bench/tiny-llama"},
            "output": {"uri": "s3://bench/out"},
            "stages": [{"name": f"s{i}", "type": "sft", "dataset": {"uri": "s3://bench/sft.jsonl", "format": "messages"},
                        "resources": {"gpusPerNode": 0, "tolerations": [KWOK_TOLERATION]}} for i in range(stages)],
        },
    }


def direct_pytorchjob(name: str) -> dict[str, Any]:
    """The PyTorchJob kubetune renders for a one-stage job, applied by hand: no kubetune labels,
    no owner, no StageRun ConfigMap (KWOK mounts nothing)."""
    from kubetune.api.finetunejob import FineTuneJob
    from kubetune.api.stagerun import render_stage_run
    from kubetune.backends import BackendSettings
    from kubetune.backends import pytorchjob as backend

    body = finetunejob(name, 1)
    body["metadata"]["namespace"] = "direct"
    job = FineTuneJob.model_validate(body)
    settings = BackendSettings()
    pj = backend.render(job, 0, render_stage_run(job, 0, "s3://bench/out", None), settings)
    pj["metadata"] = {"name": name}
    return pj


# --- watching -------------------------------------------------------------------------------


@dataclass
class Seen:
    """When this process first saw each object, and each one's Running and Succeeded."""

    created: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    succeeded: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _condition(obj: dict[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


@contextlib.contextmanager
def watching(api: client.ApiClient, resource: tuple[str, str, str], namespace: str) -> Iterator[Seen]:
    seen, stop = Seen(), threading.Event()
    custom = client.CustomObjectsApi(api)

    def run() -> None:
        rv = custom.list_namespaced_custom_object(*resource[:2], namespace, resource[2])["metadata"]["resourceVersion"]
        while not stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(custom.list_namespaced_custom_object, *resource[:2], namespace, resource[2],
                                   resource_version=rv, timeout_seconds=5, allow_watch_bookmarks=True):
                    now = time.monotonic()
                    obj = ev["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] == "BOOKMARK":
                        continue
                    name = obj["metadata"]["name"]
                    with seen.lock:
                        seen.created.setdefault(name, now)
                        if _condition(obj, "Running"):
                            seen.running.setdefault(name, now)
                        if _condition(obj, "Succeeded"):
                            seen.succeeded.setdefault(name, now)
                    if stop.is_set():
                        break
            except client.ApiException as e:
                if e.status != 410:
                    raise
                rv = custom.list_namespaced_custom_object(*resource[:2], namespace,
                                                          resource[2])["metadata"]["resourceVersion"]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)


def wait_until(what: str, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def settle(training_operator: Callable[[], str] | None, quiet: float = 5.0, timeout: float = 300,
           log: Callable[[str], None] = print) -> float:
    """Wait until the training-operator sent no API request for `quiet` seconds (at most `timeout`:
    other work on a shared cluster may keep it busy); the seconds from the call to its last request.
    It writes its Events through the same client-side rate limit as its pods and status writes, and
    under a burst they fall behind: at N = 500 about one Event a PyTorchJob was still queued when
    the last PyTorchJob succeeded, and was written in the next phase, costing that phase its time.
    Each phase starts from a training-operator with nothing left to send, so each pays for its own."""
    if training_operator is None:
        return 0.0
    t0 = time.monotonic()
    last, since = TrainingOperatorCounts.parse(training_operator()).requests, time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() - t0 > timeout:
            log(f"the training-operator was still sending requests after {timeout:.0f}s; the next phase starts anyway")
            break
        time.sleep(0.5)
        now = TrainingOperatorCounts.parse(training_operator()).requests
        if now != last:
            last, since = now, time.monotonic()
    return since - t0


def create_all(api: client.ApiClient, resource: tuple[str, str, str], namespace: str,
               bodies: list[dict[str, Any]]) -> dict[str, float]:
    """Create every body at once (a few threads, as `kubectl apply` of a big file would); when each
    create returned."""
    custom = client.CustomObjectsApi(api)

    def create(body: dict[str, Any]) -> tuple[str, float]:
        custom.create_namespaced_custom_object(*resource[:2], namespace, resource[2], body)
        return body["metadata"]["name"], time.monotonic()

    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        return dict(pool.map(create, bodies))


def quantiles(values: list[float]) -> tuple[float, float]:
    """(p50, p95) of `values`, seconds."""
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=20, method="inclusive")
    return statistics.median(values), q[18]


# --- the operator ---------------------------------------------------------------------------


@dataclass
class OperatorProcess:
    """The operator being measured: its pid (for RSS and CPU) and its metrics port."""

    pid: int
    metrics_port: int

    def peak_rss_mib(self) -> float:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def metric(self, name: str, having: str = "") -> float:
        """The sum of metric `name`'s samples (those whose labels include `having`, e.g. 'result="retry"')."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if (line.startswith(name + "{") or line.startswith(name + " ")) and having in line)


def process_cpu_seconds(pid: int | str) -> float:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def control_plane_cpu_seconds(state: Path) -> float:
    """CPU seconds so far of the local cluster's processes (API server, etcd, scheduler,
    controller-manager, training-operator, KWOK): those whose command line names its state folder."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if str(state).encode() in (proc / "cmdline").read_bytes():
                total += process_cpu_seconds(proc.name)
        except OSError:  # exited meanwhile
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all the machine's cores spent busy so far (/proc/stat: all but idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cores_busy_since(t0: float, busy0: float) -> float:
    """The machine's cores busy on average since monotonic time `t0`, when it had been busy `busy0` seconds."""
    return (machine_busy_seconds() - busy0) / (time.monotonic() - t0)


def training_operator_metrics(state: Path) -> str:
    """The training-operator's /metrics (controller-runtime's: its client's requests by method and
    code, its reconciles by result), found by the metrics address on its command line."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if str(state) in " ".join(args) and "--enable-scheme=pytorchjob" in args:
            address = next(a.split("=", 1)[1] for a in args if a.startswith("--metrics-bind-address="))
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as rsp:
                return str(rsp.read().decode())
    raise RuntimeError(f"no training-operator of the cluster in {state} is running")


@dataclass(frozen=True)
class TrainingOperatorCounts:
    """The training-operator's counters at one moment: API requests (all, and refused with 409
    Conflict) and reconciles of PyTorchJobs (all, and those that ended in an error)."""

    requests: float = math.nan
    conflicts: float = math.nan
    reconciles: float = math.nan
    errors: float = math.nan

    @staticmethod
    def parse(text: str) -> TrainingOperatorCounts:
        def total(name: str, having: str = "") -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(name + "{") and having in line)
        return TrainingOperatorCounts(
            requests=total("rest_client_requests_total"), conflicts=total("rest_client_requests_total", 'code="409"'),
            reconciles=total("controller_runtime_reconcile_total", 'controller="pytorchjob-controller"'),
            errors=total("controller_runtime_reconcile_total", 'result="error"'))

    def __sub__(self, other: TrainingOperatorCounts) -> TrainingOperatorCounts:
        return TrainingOperatorCounts(self.requests - other.requests, self.conflicts - other.conflicts,
                                      self.reconciles - other.reconciles, self.errors - other.errors)


@dataclass(frozen=True)
class OperatorCounts:
    """kubetune's operator's counters at one moment: its API requests (all, by the API server's
    count; the handlers' own), its reconciles (all, retried, by trigger) and the seconds its
    handlers waited for the client-side rate limit."""

    requests: float
    handler_requests: float
    reconciles: float
    retries: float
    throttled_seconds: float
    triggers: dict[str, float]

    @staticmethod
    def read(api: client.ApiClient, operator: OperatorProcess) -> OperatorCounts:
        return OperatorCounts(
            requests=apiserver_requests(api, OPERATOR_FLOW_SCHEMA),
            handler_requests=operator.metric("kubetune_api_requests_total"),
            reconciles=operator.metric("kubetune_reconciles_total"),
            retries=operator.metric("kubetune_reconciles_total", 'result="retry"'),
            throttled_seconds=operator.metric("kubetune_api_throttled_seconds_total"),
            triggers={t: operator.metric("kubetune_reconciles_total", f'trigger="{t}"') for t in TRIGGERS})

    def __sub__(self, other: OperatorCounts) -> OperatorCounts:
        return OperatorCounts(self.requests - other.requests, self.handler_requests - other.handler_requests,
                              self.reconciles - other.reconciles, self.retries - other.retries,
                              self.throttled_seconds - other.throttled_seconds,
                              {t: v - other.triggers[t] for t, v in self.triggers.items()})


@dataclass
class Audited:
    """Requests of one user in the API server's audit log, by verb, resource and subresource, with
    the response code where it is not a success ("update pytorchjobs/status", "create events (409)"):
    how many, and the seconds each took the API server (received to response complete)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.seconds.items()}

    def latency_ms(self) -> tuple[float, float]:
        """p50 / p95 of every request's time in the API server (ms), watches left out (they last)."""
        every = [s * 1000 for k, v in self.seconds.items() if not k.startswith("watch ") for s in v]
        return quantiles(every) if every else (math.nan, math.nan)


def audited_requests(log: Path, user: str, since: float, until: float) -> Audited:
    """`user`'s requests of the API server's audit log (e2e/cluster/up's KUBETUNE_AUDIT_USERS) received
    from `since` to `until` (Unix seconds)."""
    audited = Audited()
    with log.open() as lines:
        for line in lines:
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete" or event["user"].get("username") != user:
                continue
            received = datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
            if not since <= received <= until:
                continue
            ref = event.get("objectRef") or {}
            what = f"{event['verb']} {ref.get('resource', event.get('requestURI', '?'))}"
            what += f"/{ref['subresource']}" if ref.get("subresource") else ""
            code = (event.get("responseStatus") or {}).get("code", 200)
            what += f" ({code})" if not 200 <= code < 300 else ""
            took = datetime.fromisoformat(event["stageTimestamp"]).timestamp() - received
            audited.seconds.setdefault(what, []).append(took)
    return audited


def apiserver_requests(api: client.ApiClient, flow_schema: str) -> float:
    """Requests the API server dispatched for `flow_schema` (APF), from its /metrics."""
    rsp = api.call_api("GET", api.configuration.host + "/metrics", header_params={"Accept": "text/plain"},
                       _request_timeout=30)
    rsp.read()
    text = rsp.data.decode()
    pattern = re.compile(r'^apiserver_flowcontrol_dispatched_requests_total\{[^}]*flow_schema="' + re.escape(flow_schema)
                         + r'"[^}]*\} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(text))


# --- one run --------------------------------------------------------------------------------


@dataclass
class Figures:
    n: int
    direct_seconds: float = math.nan
    kubetune_seconds: float = math.nan
    create_latency: tuple[float, float] = (math.nan, math.nan)
    handoff_latency: tuple[float, float] = (math.nan, math.nan)
    two_stage_seconds: float = math.nan
    peak_rss_mib: float = math.nan
    phase2_peak_rss_mib: float = math.nan  # the peak by the end of phase 2: N FineTuneJobs and N PyTorchJobs
    cpu_seconds: float = math.nan
    reconciles: float = math.nan
    retries: float = math.nan
    requests: float = math.nan
    handler_requests: float = math.nan
    throttled_seconds: float = math.nan
    control_plane_cpu: tuple[float, float] = (math.nan, math.nan)  # phase 1, phase 2
    operator_phase2_cpu: float = math.nan
    # phase 1, phase 2: how long the training-operator's requests went on after the last Succeeded (its Events,
    # behind its rate limit), counted in the phase's requests, not in its seconds
    drain_seconds: tuple[float, float] = (math.nan, math.nan)
    cores_busy: tuple[float, float] = (math.nan, math.nan)  # the machine's, averaged over phase 1, phase 2
    bench_cpu: tuple[float, float] = (math.nan, math.nan)  # this process's (its creates and watches), phase 1, phase 2
    triggers: dict[str, float] = field(default_factory=dict)  # the operator's reconciles of phases 2 and 3 by trigger
    training_operator: tuple[TrainingOperatorCounts, TrainingOperatorCounts] = (
        TrainingOperatorCounts(), TrainingOperatorCounts())  # what it did in phase 1, phase 2
    phase_times: tuple[tuple[float, float], tuple[float, float]] = (
        (math.nan, math.nan), (math.nan, math.nan))  # when phases 1 and 2 began and ended (Unix seconds)
    # --audit: the training-operator's requests in phase 1 and phase 2, and the operator's in phases 2 and 3
    training_operator_requests: tuple[Audited, Audited] = (Audited(), Audited())
    operator_requests: Audited = field(default_factory=Audited)
    # --steady: how long N held FineTuneJobs were left running, and what the operator did meanwhile
    steady_seconds: float = 0.0
    steady_reconciles: float = math.nan
    steady_requests: float = math.nan
    steady_handler_requests: float = math.nan
    steady_triggers: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.direct_seconds / self.kubetune_seconds

    @property
    def requests_per_reconcile(self) -> float:
        return self.requests / self.reconciles if self.reconciles else math.nan

    @property
    def handler_requests_per_reconcile(self) -> float:
        return self.handler_requests / self.reconciles if self.reconciles else math.nan

    @property
    def steady_requests_per_reconcile(self) -> tuple[float, float]:
        """The steady state's API requests per reconcile: all, the handlers' own."""
        if not self.steady_reconciles:
            return math.nan, math.nan
        return self.steady_requests / self.steady_reconciles, self.steady_handler_requests / self.steady_reconciles

    @property
    def requests_per_job(self) -> tuple[float, float]:
        """API requests per FineTuneJob of phases 2 and 3 (2N jobs): all, and the handlers' own. Unlike
        the figures per reconcile, these fall when a reconcile with nothing to do is left out."""
        return self.requests / (2 * self.n), self.handler_requests / (2 * self.n)


def ensure_namespace(api: client.ApiClient, name: str) -> None:
    with contextlib.suppress(client.ApiException):
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_until(f"ServiceAccount {name}/default", lambda: bool(
        client.CoreV1Api(api).list_namespaced_service_account(name, field_selector="metadata.name=default").items), 60)


def measure(api: client.ApiClient, operator: OperatorProcess | None, n: int, *, prefix: str = "bench",
            timeout: float = 900, start_operator: Callable[[], OperatorProcess] | None = None,
            control_plane: Callable[[], float] | None = None, training_operator: Callable[[], str] | None = None,
            steady: float = 0.0, log: Callable[[str], None] = print) -> Figures:
    """The three phases on the cluster of `api`, and the steady state for `steady` seconds (none: 0).
    The operator is either running already, or started by `start_operator` after the direct phase
    (so that one has the training-operator alone). `control_plane`: the cluster's CPU seconds so
    far, to tell what each phase cost it; `training_operator`: its /metrics, to tell what each phase
    cost it."""
    fig = Figures(n)
    cluster_cpu = control_plane or (lambda: math.nan)

    def to_counts() -> TrainingOperatorCounts:
        return TrainingOperatorCounts.parse(training_operator()) if training_operator else TrainingOperatorCounts()
    direct_ns, ftj_ns, two_ns = f"{prefix}-direct", f"{prefix}-kubetune", f"{prefix}-handoff"
    for ns in (direct_ns, ftj_ns, two_ns):
        ensure_namespace(api, ns)

    log(f"[n={n}] direct: {n} PyTorchJobs applied to the training-operator alone")
    with watching(api, PJ, direct_ns) as seen:
        t0, cp0, busy0, to0 = time.monotonic(), cluster_cpu(), machine_busy_seconds(), to_counts()
        wall0, own0 = time.time(), process_cpu_seconds(os.getpid())
        create_all(api, PJ, direct_ns, [direct_pytorchjob(f"d{i}") for i in range(n)])
        wait_until("the direct PyTorchJobs to succeed", lambda: len(seen.succeeded) >= n, timeout)
        fig.direct_seconds = max(seen.succeeded.values()) - t0
        direct_drain = settle(training_operator, log=log)
        direct_wall = (wall0, time.time())
        direct_cp, direct_busy, direct_to = cluster_cpu() - cp0, cores_busy_since(t0, busy0), to_counts() - to0
        direct_own = process_cpu_seconds(os.getpid()) - own0
    log(f"[n={n}] direct: all succeeded in {fig.direct_seconds:.1f}s")

    if operator is None:
        assert start_operator is not None
        operator = start_operator()
    counts0 = OperatorCounts.read(api, operator)
    cpu0 = operator.cpu_seconds()

    log(f"[n={n}] kubetune: {n} one-stage FineTuneJobs")
    with watching(api, PJ, ftj_ns) as pjs, watching(api, FTJ, ftj_ns) as jobs:
        t0, cp0, busy0, to0 = time.monotonic(), cluster_cpu(), machine_busy_seconds(), to_counts()
        wall0, own0 = time.time(), process_cpu_seconds(os.getpid())
        created = create_all(api, FTJ, ftj_ns, [finetunejob(f"k{i}", 1) for i in range(n)])
        wait_until("the FineTuneJobs to succeed", lambda: len(jobs.succeeded) >= n, timeout)
        fig.kubetune_seconds = max(jobs.succeeded.values()) - t0
        fig.drain_seconds = (direct_drain, settle(training_operator, log=log))
        fig.phase_times = (direct_wall, (wall0, time.time()))
        fig.training_operator = (direct_to, to_counts() - to0)
        fig.control_plane_cpu = (direct_cp, cluster_cpu() - cp0)
        fig.cores_busy = (direct_busy, cores_busy_since(t0, busy0))
        fig.bench_cpu = (direct_own, process_cpu_seconds(os.getpid()) - own0)
        fig.operator_phase2_cpu = operator.cpu_seconds() - cpu0
        fig.create_latency = quantiles([pjs.created[f"k{i}-s0"] - created[f"k{i}"] for i in range(n)])
        fig.phase2_peak_rss_mib = operator.peak_rss_mib()
    log(f"[n={n}] kubetune: all succeeded in {fig.kubetune_seconds:.1f}s")

    log(f"[n={n}] hand-off: {n} two-stage FineTuneJobs")
    with watching(api, PJ, two_ns) as pjs, watching(api, FTJ, two_ns) as jobs:
        t0 = time.monotonic()
        create_all(api, FTJ, two_ns, [finetunejob(f"h{i}", 2) for i in range(n)])
        wait_until("the two-stage FineTuneJobs to succeed", lambda: len(jobs.succeeded) >= n, timeout * 2)
        fig.two_stage_seconds = max(jobs.succeeded.values()) - t0
        fig.handoff_latency = quantiles([pjs.created[f"h{i}-s1"] - pjs.succeeded[f"h{i}-s0"] for i in range(n)])
    log(f"[n={n}] hand-off: all succeeded in {fig.two_stage_seconds:.1f}s")

    time.sleep(2)  # the last status writes and Events
    counts = OperatorCounts.read(api, operator) - counts0
    fig.requests, fig.handler_requests, fig.reconciles = counts.requests, counts.handler_requests, counts.reconciles
    fig.retries, fig.throttled_seconds, fig.triggers = counts.retries, counts.throttled_seconds, counts.triggers
    fig.cpu_seconds = operator.cpu_seconds() - cpu0
    fig.peak_rss_mib = operator.peak_rss_mib()
    if steady > 0:
        measure_steady(api, operator, fig, steady, f"{prefix}-steady", timeout, log)
    return fig


def measure_steady(api: client.ApiClient, operator: OperatorProcess, fig: Figures, seconds: float, namespace: str,
                   timeout: float, log: Callable[[str], None]) -> None:
    """Phase 4: N one-stage FineTuneJobs held Running (KWOK keeps their pods Running for 30 min);
    once every PyTorchJob runs and the creates' last writes are in, the operator's reconciles and
    API requests over `seconds` with nothing applied: the steady state of a cluster whose jobs
    train. The jobs are deleted afterwards (their pods would hold a shared cluster's nodes)."""
    n = fig.n
    ensure_namespace(api, namespace)
    log(f"[n={n}] steady state: {n} one-stage FineTuneJobs held Running, then {seconds:.0f}s alone")
    with watching(api, PJ, namespace) as pjs:
        create_all(api, FTJ, namespace, [finetunejob(f"r{i}", 1, HOLD) for i in range(n)])
        wait_until("the held PyTorchJobs to run", lambda: len(pjs.running) >= n, timeout)
    time.sleep(5)  # the last reconciles the Running conditions woke, and their status writes
    counts0 = OperatorCounts.read(api, operator)
    t0 = time.monotonic()
    time.sleep(seconds)
    fig.steady_seconds = time.monotonic() - t0
    counts = OperatorCounts.read(api, operator) - counts0
    fig.steady_requests, fig.steady_handler_requests = counts.requests, counts.handler_requests
    fig.steady_reconciles, fig.steady_triggers = counts.reconciles, counts.triggers
    client.CustomObjectsApi(api).delete_collection_namespaced_custom_object(*FTJ[:2], namespace, FTJ[2])
    log(f"[n={n}] steady state: {fig.steady_reconciles:.0f} reconciles, {fig.steady_requests:.0f} requests")


# --- a cluster and an operator of this run --------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_cluster(nodes: int, audit_users: str = "") -> Iterator[Path]:
    """e2e/cluster/up in a state folder and on ports of its own, with `nodes` fake nodes (and an
    audit log of `audit_users`' requests, audit.log beside it); its admin kubeconfig. Stopped afterwards."""
    ports = ("ETCD_PORT", "ETCD_PEER_PORT", "APISERVER_PORT", "KCM_PORT", "SCHEDULER_PORT", "KWOK_PORT",
             "TO_METRICS_PORT", "TO_PROBE_PORT", "TO_WEBHOOK_PORT")
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as state:
        env = {**os.environ, **{f"KUBETUNE_{p}": str(_free_port()) for p in ports},
               "KUBETUNE_CLUSTER_DIR": state, "KUBETUNE_FAKE_NODES": str(nodes), "KUBETUNE_AUDIT_USERS": audit_users}
        subprocess.run([str(CLUSTER / "build")], check=True, stdout=subprocess.DEVNULL)
        up = subprocess.run([str(CLUSTER / "up")], env=env, check=True, stdout=subprocess.PIPE, text=True)
        try:
            yield Path(up.stdout.strip().splitlines()[-1].removeprefix("export KUBECONFIG="))
        finally:
            subprocess.run([str(CLUSTER / "down")], env=env, check=False, stdout=subprocess.DEVNULL)


def bin_dir() -> Path:
    return Path(subprocess.run([str(CLUSTER / "build"), "--print-bin-dir"], check=True, stdout=subprocess.PIPE,
                               text=True).stdout.strip())


def operator_kubeconfig(api: client.ApiClient, kubectl: Path, admin: Path, work: Path) -> Path:
    """A kubeconfig of a ServiceAccount allowed everything (this measures speed, not RBAC): its
    requests fall in the `service-accounts` flow schema, which nothing else here does."""
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubetune-bench-system"}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kubetune", "namespace": "kubetune-bench-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "kubetune-bench"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
         "subjects": [{"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-bench-system"}]},
    ]
    subprocess.run([str(kubectl), "--kubeconfig", str(admin), "apply", "-f", "-"], input=yaml.safe_dump_all(docs),
                   text=True, check=True, stdout=subprocess.DEVNULL)
    return service_account_kubeconfig(api, "kubetune-bench-system", "kubetune", work / "operator.kubeconfig")


# What the operator imports, compiled to bytecode before it starts (operator_env).
OPERATOR_PACKAGES = ("kubetune", "kopf", "kubernetes", "aiohttp", "pydantic", "celpy", "lark", "prometheus_client",
                     "urllib3", "yaml", "multidict", "yarl", "python_json_logger")


def operator_env(kubeconfig: Path) -> dict[str, str]:
    """The operator's environment: its kubeconfig, and Python bytecode compiled ahead, as in the
    operator image (its build compiles every module, UV_COMPILE_BYTECODE=1). Without bytecode each
    module is compiled from source when first imported (the virtualenv here has none, and
    PYTHONDONTWRITEBYTECODE may be set), which costs a process that imports the kubernetes client's
    generated modules tens of MiB of peak RSS that the deployed operator never pays. The bytecode is
    written under ~/.cache/kubetune/pycache (PYTHONPYCACHEPREFIX), leaving the virtualenv as it is."""
    import importlib.util

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(KUBECONFIG=str(kubeconfig), PYTHONPYCACHEPREFIX=str(Path.home() / ".cache" / "kubetune" / "pycache"))
    dirs = []
    for name in OPERATOR_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs += list(spec.submodule_search_locations)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return env


@contextlib.contextmanager
def operator_process(kubeconfig: Path, log_file: Path) -> Iterator[Callable[[], OperatorProcess]]:
    """A starter of `kubetune operator --standalone --all-namespaces` (the defaults a user gets,
    trainer progress off: KWOK's pods serve none); stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    env = operator_env(kubeconfig)

    def start() -> OperatorProcess:
        metrics_port, liveness_port = _free_port(), _free_port()
        args = [str(Path(sys.executable).parent / "kubetune"), "operator", "--all-namespaces", "--standalone",
                "--metrics-port", str(metrics_port), "--liveness-port", str(liveness_port), "--no-trainer-progress"]
        with log_file.open("ab") as out:
            procs.append(subprocess.Popen(args, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))

        def alive() -> bool:
            if procs[-1].poll() is not None:
                raise RuntimeError(f"the operator exited; see {log_file}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=1):
                    return True
            except OSError:
                return False

        wait_until("the operator's /healthz", alive, 60)
        return OperatorProcess(procs[-1].pid, metrics_port)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def run(n: int, log: Callable[[str], None] = print, audit: bool = False, steady: float = 0.0) -> Figures:
    """The three phases on a cluster of their own (and the steady state for `steady` seconds);
    `audit`: the training-operator's requests of phases 1 and 2 and the operator's of phases 2 and
    3, by verb and resource, from an audit log."""
    # every pod of the run fits (110 a node; Succeeded pods are left in place): N + N + 2N (+ N held)
    nodes = max(4, math.ceil((5 if steady > 0 else 4) * n / 100))
    log(f"[n={n}] starting a local cluster with {nodes} fake nodes")
    audit_users = f"{TRAINING_OPERATOR_USER},{OPERATOR_USER}" if audit else ""
    with local_cluster(nodes, audit_users) as admin, tempfile.TemporaryDirectory(prefix="kubetune-bench-op-") as work:
        kubectl = bin_dir() / "kubectl"
        subprocess.run([str(kubectl), "--kubeconfig", str(admin), "apply", "--server-side", "-f", str(REPO / "crds")],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([str(kubectl), "--kubeconfig", str(admin), "wait", "--for=condition=Established",
                        "--timeout=60s", "-f", str(REPO / "crds")], check=True, stdout=subprocess.DEVNULL)
        api = config.new_client_from_config(config_file=str(admin))  # type: ignore[no-untyped-call]
        api.configuration.connection_pool_maxsize = 4 * CREATE_THREADS
        api.rest_client = client.rest.RESTClientObject(api.configuration)
        op_config = operator_kubeconfig(api, kubectl, admin, Path(work))
        with operator_process(op_config, Path(work) / "operator.log") as start:
            fig = measure(api, None, n, start_operator=start, control_plane=lambda: control_plane_cpu_seconds(admin.parent),
                          training_operator=lambda: training_operator_metrics(admin.parent), steady=steady, log=log)
        if audit:
            time.sleep(2)  # the audit log's last lines
            audit_log = admin.parent / "audit.log"
            first, second = (audited_requests(audit_log, TRAINING_OPERATOR_USER, *t) for t in fig.phase_times)
            fig.training_operator_requests = (first, second)
            fig.operator_requests = audited_requests(audit_log, OPERATOR_USER, fig.phase_times[1][0], time.time())
            log(by_request_table(fig))
        return fig


def by_request_table(fig: Figures) -> str:
    """The training-operator's requests per PyTorchJob by verb and resource, phase 1 against phase 2,
    with their time in the API server; then the operator's per FineTuneJob of phases 2 and 3."""
    first, second = (a.counts() for a in fig.training_operator_requests)
    rows = sorted(set(first) | set(second), key=lambda k: -(first.get(k, 0) + second.get(k, 0)))
    (p50a, p95a), (p50b, p95b) = (a.latency_ms() for a in fig.training_operator_requests)
    ours = fig.operator_requests.counts()
    return ("| Training-operator's requests per PyTorchJob | phase 1 (alone) | phase 2 (kubetune's) |\n|---|---:|---:|\n"
            + "".join(f"| {k} | {first.get(k, 0) / fig.n:.2f} | {second.get(k, 0) / fig.n:.2f} |\n" for k in rows)
            + f"| all | {sum(first.values()) / fig.n:.2f} | {sum(second.values()) / fig.n:.2f} |\n"
            + f"| their time in the API server, p50 / p95 (ms) | {p50a:.1f} / {p95a:.1f} | {p50b:.1f} / {p95b:.1f} |\n"
            + "\n| The operator's requests per FineTuneJob, phases 2 and 3 | |\n|---|---:|\n"
            + "".join(f"| {k} | {v / (2 * fig.n):.2f} |\n" for k, v in sorted(ours.items(), key=lambda kv: -kv[1]))
            + f"| all | {sum(ours.values()) / (2 * fig.n):.2f} |\n")


# --- report ---------------------------------------------------------------------------------


def table(figures: list[Figures]) -> str:
    rows = [
        ("Training-operator alone: N PyTorchJobs, all Succeeded (s)", lambda f: f"{f.direct_seconds:.1f}"),
        ("kubetune: N one-stage FineTuneJobs, all Succeeded (s)", lambda f: f"{f.kubetune_seconds:.1f}"),
        ("Throughput ratio (alone / kubetune; 1.0 = no cost)", lambda f: f"{f.ratio:.2f}"),
        ("FineTuneJob created -> PyTorchJob created, p50 / p95 (s)",
         lambda f: f"{f.create_latency[0]:.2f} / {f.create_latency[1]:.2f}"),
        ("N two-stage FineTuneJobs, all Succeeded (s)", lambda f: f"{f.two_stage_seconds:.1f}"),
        ("Stage hand-off (Succeeded -> next PyTorchJob created), p50 / p95 (s)",
         lambda f: f"{f.handoff_latency[0]:.2f} / {f.handoff_latency[1]:.2f}"),
        ("Operator peak RSS by the end of phase 2 (N FineTuneJobs, N PyTorchJobs) / phase 3 (2N, 3N) (MiB)",
         lambda f: f"{f.phase2_peak_rss_mib:.0f} / {f.peak_rss_mib:.0f}"),
        ("Operator CPU, phases 2 and 3 (s)", lambda f: f"{f.cpu_seconds:.1f}"),
        ("Control plane CPU, phase 1 / phase 2 (s); the operator's, phase 2",
         lambda f: f"{f.control_plane_cpu[0]:.0f} / {f.control_plane_cpu[1]:.0f}; {f.operator_phase2_cpu:.0f}"),
        ("Machine's cores busy, phase 1 / phase 2 (average)", lambda f: f"{f.cores_busy[0]:.2f} / {f.cores_busy[1]:.2f}"),
        ("This benchmark's own CPU (its creates and watches), phase 1 / phase 2 (s)",
         lambda f: f"{f.bench_cpu[0]:.0f} / {f.bench_cpu[1]:.0f}"),
        ("Training-operator's requests after the last Succeeded (its Events behind its rate limit), phase 1 / "
         "phase 2 (s)", lambda f: f"{f.drain_seconds[0]:.1f} / {f.drain_seconds[1]:.1f}"),
        ("Training-operator per PyTorchJob, phase 1 / phase 2: API requests (409 Conflict); reconciles (errors)",
         lambda f: " / ".join(f"{c.requests / f.n:.1f} ({c.conflicts / f.n:.2f}); {c.reconciles / f.n:.1f} "
                              f"({c.errors / f.n:.2f})" for c in f.training_operator)),
        ("Reconciles (of which retried: a write refused as stale, or throttled)",
         lambda f: f"{f.reconciles:.0f} ({f.retries:.0f})"),
        ("Reconciles per FineTuneJob by what woke them: its change / its PyTorchJob / the timer",
         lambda f: " / ".join(f"{f.triggers.get(t, math.nan) / (2 * f.n):.1f}" for t in TRIGGERS)),
        ("API requests per reconcile, all (kopf's and the handlers')", lambda f: f"{f.requests_per_reconcile:.2f}"),
        ("API requests per reconcile, the handlers' own", lambda f: f"{f.handler_requests_per_reconcile:.2f}"),
        ("API requests per FineTuneJob, all / the handlers' own",
         lambda f: f"{f.requests_per_job[0]:.1f} / {f.requests_per_job[1]:.1f}"),
        ("Seconds the handlers' requests waited for the client-side rate limit, summed",
         lambda f: f"{f.throttled_seconds:.0f}"),
        ("Steady state, N held FineTuneJobs Running (--steady): seconds; reconciles per job (the timer's); "
         "API requests per job a minute", lambda f: (
             f"{f.steady_seconds:.0f}; {f.steady_reconciles / f.n:.2f} ({f.steady_triggers.get('timer', math.nan) / f.n:.2f}); "
             f"{60 * f.steady_requests / f.steady_seconds / f.n:.2f}") if f.steady_seconds else "nan"),
        ("Steady state: API requests per reconcile, all / the handlers' own",
         lambda f: " / ".join(f"{v:.2f}" for v in f.steady_requests_per_reconcile) if f.steady_seconds else "nan"),
    ]
    head = "| | " + " | ".join(f"N = {f.n}" for f in figures) + " |\n|---|" + "---:|" * len(figures) + "\n"
    return head + "".join(f"| {label} | " + " | ".join(cell(f).replace("nan", "–") for f in figures) + " |\n"
                          for label, cell in rows)  # –: not measured (a run of an older version of this script)


def write(path: Path, figures: list[Figures], command: str, notes: str) -> None:
    """Replace the operator-scale section of `path` in place (or add it; or create the file)."""
    write_section(path, f"## Operator scale\n\n<!-- written by bench/operator_scale.py -->\n"
                        f"Machine: {machine()}. Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n\n"
                        f"    {command}\n\n{table(figures)}\n{notes}")


NOTES = """Each N on a fresh local cluster (e2e/cluster/up; KWOK pods succeed 2 s after they start;
4N/100 fake nodes so every pod fits). Phase 1 applies N PyTorchJobs to the training-operator with
kubetune not running; phase 2 N one-stage FineTuneJobs (which render the same PyTorchJobs) with
`kubetune operator --standalone --all-namespaces --no-trainer-progress` and its defaults otherwise;
phase 3 N two-stage FineTuneJobs; with --steady, phase 4 N one-stage FineTuneJobs whose pods KWOK
keeps Running, counted over that many seconds once all run (nothing applied meanwhile). Objects
are created by 8 threads at once; times are when the benchmark's own watches saw each event. Each phase starts once the training-operator has sent no
request for 5 s: its Events fall behind its rate limit under a burst, and the ones a phase left
unsent would otherwise be written in, and slow, the next. Goals (issue 16): ratio >= 1.0 at
N = 1,000, hand-off p50 <= 1 s, peak RSS <= 150 MiB at 1,000 FineTuneJobs and 2,000 PyTorchJobs,
<= 3 requests per reconcile in steady state.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, action="append", help="jobs per phase (repeat for several runs; default: 100)")
    p.add_argument("--write", type=Path, default=None, help="write the figures into this markdown file")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    p.add_argument("--audit", action="store_true",
                   help="count the training-operator's requests by verb and resource (an audit log of the API server)")
    p.add_argument("--steady", type=float, default=0.0, metavar="SECONDS",
                   help="then hold N FineTuneJobs Running this long: requests per reconcile in steady state")
    args = p.parse_args(argv)
    figures = []
    for n in args.n or [100]:
        figures.append(run(n, audit=args.audit, steady=args.steady))
        print(table(figures), flush=True)
    if args.json:
        print(json.dumps([{**f.__dict__, "training_operator": [c.__dict__ for c in f.training_operator],
                           "training_operator_requests": [a.counts() for a in f.training_operator_requests],
                           "operator_requests": f.operator_requests.counts(),
                           "ratio": f.ratio, "requests_per_reconcile": f.requests_per_reconcile}
                          for f in figures], indent=2))
    if args.write:
        command = ("python -m bench.operator_scale " + " ".join(f"--n {f.n}" for f in figures)
                   + (f" --steady {args.steady:g}" if args.steady else "") + f" --write {args.write}")
        write(args.write, figures, command, NOTES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
