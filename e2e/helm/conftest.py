"""Fixtures of the Helm chart's end-to-end tests: the chart installed into the local cluster,
`kubetune operator` run with the chart's flags and the chart's ServiceAccount's token only, and
a real Prometheus running the configuration that a real prometheus-operator generated from the chart's ServiceMonitor, PodMonitor and PrometheusRule.

    .venv/bin/python -m pytest e2e/helm

The chart's Deployment cannot run here (no container runtime, no operator image): KWOK plays its
pods (so the metrics Service has endpoints), and the operator runs as a local process: the same
command line the Deployment renders, authenticated by a kubeconfig holding a TokenRequest token
of the release's ServiceAccount, so the API server judges every request by the chart's RBAC and
nothing else. Prometheus reaches that process where the pod's address stands (see `localize`).
Prometheus and prometheus-operator are built from their Go modules by e2e/cluster/build
(Debian's Prometheus has no Kubernetes service discovery); promtool is Debian's.
"""

from __future__ import annotations

import base64
import gzip
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
    CHART, KSERVE, KWOK_TOLERATION, Cluster, free_port, fresh_namespace, go_module_dir, healthy, kserve_crd, wait_for,
)

PROMETHEUS_SH = Path(__file__).parent / "prometheus.sh"
VENV_BIN = Path(sys.executable).parent
RELEASE, RELEASE_NS = "kubetune", "kubetune-system"
SERVICE_ACCOUNT = "kubetune"  # the chart's default for release "kubetune"
PROMETHEUS_OPERATOR_GO_MOD = Path(__file__).parents[1] / "cluster" / "modules" / "prometheus-operator" / "go.mod"
FTJ = ("kubetune.io", "v1alpha1", "finetunejobs")

# The values e2e installs the chart with: everything on, the validation pods allowed onto KWOK's nodes.
VALUES: dict[str, Any] = {
    "metrics": {"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"},
                                   "interval": "1s", "scrapeTimeout": "1s"},
                "podMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"},
                               "interval": "1s", "scrapeTimeout": "1s"}},
    "prometheusRule": {"enabled": True, "additionalLabels": {"release": "prometheus"}},
    "dashboards": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "operator": {"peering": {"lifetime": 10}},
    # KWOK plays the operator's pods (they get an IP and go Ready, so the metrics Service has real
    # endpoints for the ServiceMonitor); the operator's process is the local ChartOperator.
    "tolerations": [KWOK_TOLERATION],
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
    """prometheus-operator's CRDs (the version e2e/cluster/build builds), so the chart's
    monitoring objects are judged by their real schemas and prometheus-operator can run; and
    KServe's InferenceService CRD, so publishing runs its whole path, and its ClusterServingRuntime
    CRD, so the chart finds KServe there and installs the kubetune-serve runtime."""
    folder = go_module_dir(prometheus_operator_module()) / "example" / "prometheus-operator-crd"
    runtimes = go_module_dir(KSERVE) / "config" / "crd" / "full" / "serving.kserve.io_clusterservingruntimes.yaml"
    cluster.apply_crds(*sorted(folder.glob("monitoring.coreos.com_*.yaml")), kserve_crd(), runtimes)


def prometheus_operator_module() -> str:
    """`path@version` of the prometheus-operator that e2e/cluster/build builds."""
    module = "github.com/prometheus-operator/prometheus-operator"
    (version,) = [line.split()[-1] for line in PROMETHEUS_OPERATOR_GO_MOD.read_text().splitlines()
                  if line.split()[:2] in (["require", module], [module])]
    return f"{module}@{version}"


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
    trainer_namespace: str = ""  # the namespace of the trainer pod the PodMonitor finds
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


@pytest.fixture(scope="session")
def prometheus_binary() -> None:
    proc = subprocess.run([str(PROMETHEUS_SH), "install"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"e2e/helm/prometheus.sh install failed: {proc.stderr}")


def prometheus_version(binary: Path) -> str:
    """The version of a Prometheus binary, as prometheus-operator's `spec.version` takes it."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    return "v" + out.split()[2].split("+")[0]


@pytest.fixture(scope="package")
def prometheus_operator(cluster: Cluster, monitoring_crds: None,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """prometheus-operator (built from its Go module by e2e/cluster/build), as a local process
    with the admin's kubeconfig: it is not under test, the configuration it generates is."""
    log = tmp_path_factory.mktemp("prometheus-operator") / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    with log.open("ab") as out:
        proc = subprocess.Popen([str(cluster.bin_dir / "prometheus-operator"), f"--web.listen-address=127.0.0.1:{free_port()}",
                                 "--log-level=warn"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(f"prometheus-operator log: {log}")


TRAINER_JOB = "metrics-probe"
HOLD = {"kubetune.io/pod-annotations": json.dumps({"kwok.kubetune.io/delay": "30m"})}  # KWOK keeps the pods Running


@pytest.fixture(scope="package")
def trainer_pod(cluster: Cluster, admin_api: client.ApiClient, operator: ChartOperator) -> Iterator[client.V1Pod]:
    """The master pod of a one-stage FineTuneJob `metrics-probe`: rendered by the chart's
    operator, created by the training-operator, held Running by KWOK. The chart's PodMonitor
    finds the trainer through it; the trainer itself is a local `kubetune run` (no image runs here)."""
    with fresh_namespace(admin_api, f"metrics-e2e-{uuid.uuid4().hex[:6]}") as namespace:
        job = finetunejob(TRAINER_JOB, [stage("pretrain", "pretrain", "text")])
        job["metadata"]["annotations"] = HOLD
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
        core = client.CoreV1Api(admin_api)

        def running() -> client.V1Pod | None:
            pods = core.list_namespaced_pod(namespace, label_selector="training.kubeflow.org/job-role=master").items
            return next((p for p in pods if p.status.phase == "Running" and p.status.pod_ip), None)

        pod = wait_for("the probe's master pod to run", running, timeout=120)
        try:
            yield pod
        finally:
            cluster.kubectl("delete", "ftj", TRAINER_JOB, "-n", namespace, "--wait=true", "--timeout=60s", check=False)


PROMETHEUS_CR = "e2e"
RULES_DIR = "/etc/prometheus/rules/"  # where prometheus-operator's config expects the rule ConfigMaps


def generated_config(core: client.CoreV1Api, namespace: str, jobs: set[str]) -> dict[str, Any]:
    """The configuration prometheus-operator wrote for Prometheus `e2e`, once it has `jobs`."""
    def ready() -> dict[str, Any] | None:
        try:
            secret = core.read_namespaced_secret(f"prometheus-{PROMETHEUS_CR}", namespace)
        except client.ApiException:
            return None
        raw = (secret.data or {}).get("prometheus.yaml.gz")
        config = yaml.safe_load(gzip.decompress(base64.b64decode(raw))) if raw else None
        names = {c["job_name"] for c in (config or {}).get("scrape_configs") or []}
        return config if config and jobs <= names else None

    return wait_for(f"prometheus-operator to generate scrape jobs {sorted(jobs)}", ready, timeout=90)


def localize(config: dict[str, Any], kubeconfig: Path, rules: Path, processes: dict[str, int]) -> dict[str, Any]:
    """prometheus-operator's configuration, made runnable outside the cluster: the sidecar's
    variable expansion, then three edits and no other: service discovery reaches the API server through `kubeconfig`; the rule files are
    read from `rules`; and the pod IPs that KWOK invented (which route nowhere) are mapped to the
    local processes standing in for those pods (`processes`: pod IP -> local port), other
    discovered targets (the second operator replica, finished trainer pods) being dropped, as
    they have no process here. Selectors, port names, job names and target labels stay exactly
    prometheus-operator's."""
    # prometheus-config-reloader, the sidecar that hands the configuration to Prometheus in the
    # pod, expands $(POD_NAME) and $(SHARD) from its environment: do what it does for shard 0.
    text = json.dumps(config).replace("$(SHARD)", "0").replace("$(POD_NAME)", f"prometheus-{PROMETHEUS_CR}-0")
    config = json.loads(text)
    config["rule_files"] = [f.replace(RULES_DIR, f"{rules}/") for f in config.get("rule_files", [])]
    for job in config.get("scrape_configs", []):
        for sd in job.get("kubernetes_sd_configs", []):
            sd["kubeconfig_file"] = str(kubeconfig)
        relabel = job.setdefault("relabel_configs", [])
        relabel += [{"source_labels": ["__address__"], "regex": f"{ip.replace('.', '[.]')}:[0-9]+",
                     "target_label": "__address__", "replacement": f"127.0.0.1:{port}"} for ip, port in processes.items()]
        relabel.append({"source_labels": ["__address__"], "regex": "127[.]0[.]0[.]1:[0-9]+", "action": "keep"})
    return config


def start_prometheus(binary: Path, work: Path, config: dict[str, Any]) -> Prometheus:
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run([str(PROMETHEUS_SH), "run", str(work), str(path), str(free_port())], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PROMETHEUS_BIN": str(binary)})
    if proc.returncode != 0:
        pytest.fail(f"e2e/helm/prometheus.sh run failed: {proc.stderr}")
    return Prometheus(proc.stdout.strip().splitlines()[-1], work)


def stop_prometheus(prometheus: Prometheus) -> None:
    subprocess.run([str(PROMETHEUS_SH), "stop", str(prometheus.work)], check=False)


@pytest.fixture(scope="package")
def prometheus(cluster: Cluster, admin_api: client.ApiClient, release: Release, operator: ChartOperator,
               prometheus_operator: subprocess.Popen[bytes], trainer_pod: client.V1Pod, prometheus_binary: None,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus running the configuration that prometheus-operator generated from the
    chart's ServiceMonitor, PodMonitor and PrometheusRule (a Prometheus object selecting them by
    the chart's `additionalLabels`), scraping the operator and a trainer every second."""
    work, binary = tmp_path_factory.mktemp("prometheus"), cluster.bin_dir / "prometheus"  # built from its Go module
    core = client.CoreV1Api(admin_api)
    operator_pods = wait_for("the chart's operator pods to run (KWOK plays them)", lambda: sorted(
        (p for p in core.list_namespaced_pod(release.namespace, label_selector="app.kubernetes.io/component=operator").items
         if p.status.phase == "Running" and p.status.pod_ip), key=lambda p: p.metadata.name), timeout=60)
    service_monitor, pod_monitor = release.find("ServiceMonitor")["metadata"], release.find("PodMonitor")["metadata"]
    jobs = {f"serviceMonitor/{service_monitor['namespace']}/{service_monitor['name']}/0",
            f"podMonitor/{pod_monitor['namespace']}/{pod_monitor['name']}/0"}
    selector = {"matchLabels": {"release": "prometheus"}}
    with fresh_namespace(admin_api, f"monitoring-e2e-{uuid.uuid4().hex[:6]}") as namespace:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus", "metadata": {"name": PROMETHEUS_CR},
            "spec": {"version": prometheus_version(binary), "evaluationInterval": "1s",
                     "serviceMonitorSelector": selector, "serviceMonitorNamespaceSelector": {},
                     "podMonitorSelector": selector, "podMonitorNamespaceSelector": {},
                     "ruleSelector": selector, "ruleNamespaceSelector": {}}}))
        config = generated_config(core, namespace, jobs)
        rules = work / "rules"
        for name in {f.removeprefix(RULES_DIR).split("/")[0] for f in config.get("rule_files", [])}:
            data = wait_for(f"ConfigMap {name}", lambda: _configmap_data(core, namespace, name))
            (rules / name).mkdir(parents=True)
            for key, text in data.items():
                (rules / name / key).write_text(text)
        trainer_port = free_port()
        processes = {operator_pods[0].status.pod_ip: operator.metrics_port, trainer_pod.status.pod_ip: trainer_port}
        prom = start_prometheus(binary, work, localize(config, cluster.kubeconfig, rules, processes))
        prom.trainer_port, prom.trainer_namespace, prom.started = trainer_port, trainer_pod.metadata.namespace, time.time()
        service = next(d for d in release.manifest if d["kind"] == "Service")["metadata"]["name"]
        wait_for("Prometheus to scrape the operator", lambda: prom.targets_up().get(service) == "up", timeout=60)
        try:
            yield prom
        finally:
            stop_prometheus(prom)


def _configmap_data(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, str] | None:
    try:
        return core.read_namespaced_config_map(name, namespace).data or None
    except client.ApiException:
        return None
