"""Fixtures of the Helm chart's end-to-end tests: the chart installed into the local cluster,
`kubetune operator` run with the chart's flags and the chart's ServiceAccount's token only, and
a real Prometheus (Debian's) that scrapes it and a trainer.

    .venv/bin/python -m pytest e2e/helm

The chart's Deployment cannot run here (no container runtime, no operator image), so the
operator runs as a local process: the same command line the Deployment renders, authenticated
by a kubeconfig holding a TokenRequest token of the release's ServiceAccount, so the API server
judges every request by the chart's RBAC and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.conftest import (
    CHART, KWOK_TOLERATION, Cluster, free_port, fresh_namespace, go_module_dir, healthy, kserve_crd, wait_for,
)

PROMETHEUS_SH = Path(__file__).parent / "prometheus.sh"
VENV_BIN = Path(sys.executable).parent
RELEASE, RELEASE_NS = "kubetune", "kubetune-system"
SERVICE_ACCOUNT = "kubetune"  # the chart's default for release "kubetune"
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
FTJ = ("kubetune.io", "v1alpha1", "finetunejobs")

# The values e2e installs the chart with: everything on, the validation pods allowed onto KWOK's nodes.
VALUES: dict[str, Any] = {
    "metrics": {"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"}},
                "podMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"}}},
    "prometheusRule": {"enabled": True, "additionalLabels": {"release": "prometheus"}},
    "dashboards": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "operator": {"peering": {"lifetime": 10}},
    "trainer": {"validation": {"tolerations": [{"key": "kwok.x-k8s.io/node", "effect": "NoSchedule"}]}},
}


# --- the release --------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """The chart installed in the cluster: its manifest as the API server was given it."""

    name: str
    namespace: str
    manifest: list[dict[str, Any]]
    values: Path  # the values file it was installed with

    def find(self, kind: str) -> dict[str, Any]:
        (doc,) = [d for d in self.manifest if d["kind"] == kind]
        return doc

    @property
    def operator_args(self) -> list[str]:
        (container,) = self.find("Deployment")["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["kubetune"]
        return list(container["args"])


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(cluster.bin_dir / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def monitoring_crds(cluster: Cluster) -> None:
    """prometheus-operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs, so the chart's
    monitoring objects are judged by their real schemas; and KServe's InferenceService CRD, so
    publishing runs its whole path."""
    folder = go_module_dir(PROMETHEUS_OPERATOR) / "example" / "prometheus-operator-crd"
    files = [folder / f"monitoring.coreos.com_{p}.yaml" for p in ("servicemonitors", "podmonitors", "prometheusrules")]
    cluster.apply_crds(*files, kserve_crd())


def adopt_crds(cluster: Cluster, values: Path) -> None:
    """Hand the chart's CRDs that already exist (other e2e tests apply crds/ with kubectl) to the
    release the way Helm documents for adopting objects: its managed-by label and its release
    annotations. Without this `helm install` refuses them, and these tests would pass only when
    they run before every other e2e test."""
    rendered = helm(cluster, "template", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--values", str(values),
                    "--show-only", "templates/crds.yaml").stdout
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(rendered) if d and d["kind"] == "CustomResourceDefinition"]
    existing = [f"crd/{n}" for n in names if cluster.kubectl("get", "crd", n, check=False).returncode == 0]
    if existing:
        cluster.kubectl("label", "--overwrite", *existing, "app.kubernetes.io/managed-by=Helm")
        cluster.kubectl("annotate", "--overwrite", *existing, f"meta.helm.sh/release-name={RELEASE}",
                        f"meta.helm.sh/release-namespace={RELEASE_NS}")


def install(cluster: Cluster, values: Path) -> Release:
    """`helm upgrade --install` of the session's release; its manifest once its CRDs are Established."""
    adopt_crds(cluster, values)
    helm(cluster, "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NS,
         "--values", str(values), "--timeout", "120s")
    manifest = helm(cluster, "get", "manifest", RELEASE, "--namespace", RELEASE_NS).stdout
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    crds = [f"crd/{d['metadata']['name']}" for d in docs if d["kind"] == "CustomResourceDefinition"]
    wait_for("the chart's CRDs to be Established", lambda: cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=10s", *crds, check=False).returncode == 0, timeout=60)
    return Release(RELEASE, RELEASE_NS, docs, values)


@pytest.fixture(scope="session")
def release(cluster: Cluster, monitoring_crds: None, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """`helm install` of the chart (once; a release left from an earlier run is upgraded)."""
    values = tmp_path_factory.mktemp("helm") / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    # The release's namespace enforces PodSecurity "restricted": the operator's own pods must pass it.
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": RELEASE_NS, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                       "pod-security.kubernetes.io/enforce-version": "latest"}}}))
    return install(cluster, values)


# --- the operator, as the chart's ServiceAccount ---------------------------------------------


def token_kubeconfig(cluster: Cluster, namespace: str, service_account: str, path: Path, seconds: int = 3600) -> Path:
    """A kubeconfig that authenticates with a TokenRequest token of `namespace/service_account`."""
    with cluster.admin_client() as admin:
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds))
        token = client.CoreV1Api(admin).create_namespaced_service_account_token(service_account, namespace, request)
        host, ca = admin.configuration.host, admin.configuration.ssl_ca_cert
    user = f"system:serviceaccount:{namespace}:{service_account}"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "e2e", "cluster": {"server": host, "certificate-authority": ca}}],
        "users": [{"name": user, "user": {"token": token.status.token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "e2e", "user": user}}],
    }))
    path.chmod(0o600)
    return path


@dataclass
class ChartOperator:
    """`kubetune` with the Deployment's arguments, as a local process with the ServiceAccount's kubeconfig."""

    args: list[str]
    kubeconfig: Path
    log: Path
    metrics_port: int = field(default_factory=free_port)
    liveness_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        # The chart's ports would collide on one machine; argparse keeps the last of a flag.
        return [str(VENV_BIN / "kubetune"), *self.args,
                f"--metrics-port={self.metrics_port}", f"--liveness-port={self.liveness_port}"]

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "KUBERNETES_"))}
        env.update(KUBECONFIG=str(self.kubeconfig), POD_ID="kubetune-helm-e2e", PYTHONUNBUFFERED="1")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("the operator's /healthz", self._alive, timeout=60)

    def _alive(self) -> bool:
        return healthy(self.proc, self.liveness_port, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as rsp:
            return str(rsp.read().decode())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="package")
def operator(cluster: Cluster, release: Release, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartOperator]:
    """The chart's operator, for the tests of this package only: it watches every namespace, so
    it must not outlive them and act beside the operator of the other e2e tests."""
    work = tmp_path_factory.mktemp("chart-operator")
    kubeconfig = token_kubeconfig(cluster, RELEASE_NS, SERVICE_ACCOUNT, work / "sa.kubeconfig")
    op = ChartOperator(release.operator_args, kubeconfig, work / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"operator log: {op.log}")


# --- FineTuneJobs -------------------------------------------------------------------------


def stage(name: str, type_: str, fmt: str, **extra: Any) -> dict[str, Any]:
    """A stage for KWOK's fake GPU nodes, reading from S3 (nothing reads it: KWOK fakes the pods)."""
    return {"name": name, "type": type_, "dataset": {"uri": f"s3://data/{name}.jsonl", "format": fmt},
            "resources": {"gpusPerNode": 1, "tolerations": [KWOK_TOLERATION]}, **extra}


THREE_STAGES = [
    stage("pretrain", "pretrain", "text"),
    stage("sft", "sft", "messages", tuning={"method": "lora"}),
    stage("dpo", "dpo", "preference", tuning={"method": "lora"}),
]


def finetunejob(name: str, stages: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B"}, "stages": stages,
                     "output": {"uri": f"s3://models/{name}"}, **spec}}


def run_pipeline(cluster: Cluster, namespace: str, name: str, timeout: int = 180) -> dict[str, Any]:
    """Apply a three-stage FineTuneJob and wait until it succeeds; the stored object."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=yaml.safe_dump(finetunejob(name, THREE_STAGES, publish={"gpus": 1})))
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", namespace, f"ftj/{name}", f"--timeout={timeout}s",
                    timeout=timeout + 20)
    return json.loads(cluster.kubectl("get", "ftj", name, "-n", namespace, "-o", "json").stdout)


@pytest.fixture(scope="package")
def restricted_namespace(admin_api: client.ApiClient) -> Iterator[str]:
    """A namespace whose pods must meet PodSecurity `restricted`, for the session's pipelines."""
    with fresh_namespace(admin_api, f"helm-e2e-{uuid.uuid4().hex[:6]}", pod_security="restricted") as name:
        yield name


@pytest.fixture(scope="package")
def first_pipeline(cluster: Cluster, operator: ChartOperator, restricted_namespace: str,
                   prometheus: Prometheus) -> dict[str, Any]:
    """pretrain -> sft -> dpo, run by the operator as the chart's ServiceAccount (once per package
    run, while Prometheus watches)."""
    return run_pipeline(cluster, restricted_namespace, "pipe-a")


# --- Prometheus ---------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A real Prometheus on 127.0.0.1, started by e2e/helm/prometheus.sh with a test config."""

    url: str
    work: Path
    trainer_port: int = 0  # where the trainer target is expected
    started: float = 0.0

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as rsp:
            body = json.loads(rsp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expr, time=f"{at:.3f}")["result"])

    def query_range(self, expr: str, start: float, end: float, step: float = 2) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                             step=f"{step}")["result"])

    def targets_up(self) -> dict[str, str]:
        return {t["labels"]["job"]: t["health"] for t in self.get("/api/v1/targets")["activeTargets"]}


def scrape_configs(release: Release, operator_port: int, trainer_port: int, trainer_labels: dict[str, str]) -> list[dict[str, Any]]:
    """The scrape jobs prometheus-operator would make of the chart's ServiceMonitor and PodMonitor
    (job names, target labels, honor_labels, path), pointed at the local processes, every second."""
    service = next(d for d in release.manifest if d["kind"] == "Service")
    monitor = release.find("ServiceMonitor")["spec"]["endpoints"][0]
    pod_monitor = release.find("PodMonitor")
    pod_endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    return [
        {"job_name": service["metadata"]["name"], "scrape_interval": "1s", "scrape_timeout": "1s",
         "metrics_path": monitor["path"], "honor_labels": bool(monitor.get("honorLabels", False)),
         "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"], "labels": {
             "namespace": release.namespace, "service": service["metadata"]["name"], "endpoint": "metrics",
             "pod": f"{release.name}-0", "container": "operator"}}]},
        {"job_name": f"{release.namespace}/{pod_monitor['metadata']['name']}", "scrape_interval": "1s",
         "scrape_timeout": "1s", "metrics_path": pod_endpoint["path"],
         "honor_labels": bool(pod_endpoint.get("honorLabels", False)),
         "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"], "labels": trainer_labels}]},
    ]


@pytest.fixture(scope="session")
def prometheus_binary() -> None:
    proc = subprocess.run([str(PROMETHEUS_SH), "install"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"e2e/helm/prometheus.sh install failed: {proc.stderr}")


def start_prometheus(work: Path, scrape: list[dict[str, Any]], rule_files: list[Path]) -> Prometheus:
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": scrape,
    }))
    proc = subprocess.run([str(PROMETHEUS_SH), "run", str(work), str(config), str(free_port())],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"e2e/helm/prometheus.sh run failed: {proc.stderr}")
    return Prometheus(proc.stdout.strip().splitlines()[-1], work)


def stop_prometheus(prometheus: Prometheus) -> None:
    subprocess.run([str(PROMETHEUS_SH), "stop", str(prometheus.work)], check=False)


TRAINER_TARGET = {"namespace": "team-a", "pod": "metrics-probe-pretrain-master-0", "container": "pytorch",
                  "endpoint": "metrics"}  # the target labels prometheus-operator gives a PodMonitor's pods


@pytest.fixture(scope="package")
def prometheus(release: Release, operator: ChartOperator, prometheus_binary: None,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's Prometheus scraping the chart's operator and trainer targets every second, with
    the chart's PrometheusRule loaded as its rule file."""
    work = tmp_path_factory.mktemp("prometheus")
    rules = work / "kubetune-rules.yaml"
    rules.write_text(yaml.safe_dump(release.find("PrometheusRule")["spec"], sort_keys=False))
    trainer_port = free_port()
    prom = start_prometheus(work, scrape_configs(release, operator.metrics_port, trainer_port, TRAINER_TARGET), [rules])
    prom.trainer_port, prom.started = trainer_port, time.time()
    service = next(d for d in release.manifest if d["kind"] == "Service")["metadata"]["name"]
    wait_for("Prometheus to scrape the operator", lambda: prom.targets_up().get(service) == "up", timeout=30)
    try:
        yield prom
    finally:
        stop_prometheus(prom)
