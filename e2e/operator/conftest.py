"""Fixtures for the operator's end-to-end tests: the CRDs, `kubetune operator` as a real
process, bound PVCs, and a stand-in for the kubelet.

    .venv/bin/python -m pytest e2e/operator

KWOK plays pods without running them. Where a test needs a pod to really run (the
PreferenceDataset validator, a training stage), `Kubelet` below does what the kubelet would:
it runs the pod's container command as a local process with the pod's environment (volumes
mapped to local folders, the master's address to 127.0.0.1) and writes the outcome into the
pod's status (containerStatuses[].state.terminated with exit code and termination message,
phase Succeeded or Failed). Everything else (Jobs, the training-operator, the operator) reacts
to that status as it would on a real cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from e2e.conftest import KWOK_TOLERATION, REPO, Cluster, fresh_namespace, healthy, wait_for

VENV_BIN = Path(sys.executable).parent
KSERVE_MODULE = "github.com/kserve/kserve@v0.15.2"
ISVC_CRD = "config/crd/full/serving.kserve.io_inferenceservices.yaml"
FTJ = ("kubetune.io", "v1alpha1", "finetunejobs")
PREFDS = ("kubetune.io", "v1alpha1", "preferencedatasets")
ADAPTERS = ("kubetune.io", "v1alpha1", "modeladapters")
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")
# Pods carrying this stay Running under KWOK until a test's Kubelet finishes them.
HOLD = {"kwok.kubetune.io/delay": "30m"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kserve_crd() -> Path | None:
    """The InferenceService CRD from the kserve Go module (the module proxy or cache has it)."""
    if not shutil.which("go"):
        return None
    proc = subprocess.run(["go", "mod", "download", "-json", KSERVE_MODULE], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return None
    path = Path(json.loads(proc.stdout)["Dir"]) / ISVC_CRD
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def operator_crds(cluster: Cluster) -> bool:
    """kubetune's CRDs (crds/), kopf's peering CRDs and, when available, KServe's
    InferenceService CRD, installed and Established. True when KServe's is there."""
    files = [*sorted((REPO / "crds").glob("*.yaml")), Path(__file__).parent / "peering-crds.yaml"]
    isvc = kserve_crd()
    if isvc:
        files.append(isvc)
    args = [f"--filename={f}" for f in files]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", *args)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *args)
    return isvc is not None


# --- the operator process -----------------------------------------------------------------

OPERATOR_NAMESPACE = "kubetune-system"


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: Cluster, admin_api: client.ApiClient, operator_crds: bool,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig for ServiceAccount kubetune-system/kubetune-operator, bound to the ClusterRole in
    operator-rbac.yaml only: the operator gets no right the Helm chart would not give it."""
    core = client.CoreV1Api(admin_api)
    cluster.kubectl("apply", "-f", str(Path(__file__).parent / "operator-rbac.yaml"))
    if not core.list_namespace(field_selector=f"metadata.name={OPERATOR_NAMESPACE}").items:
        core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    if not core.list_namespaced_service_account(OPERATOR_NAMESPACE, field_selector="metadata.name=kubetune-operator").items:
        core.create_namespaced_service_account(OPERATOR_NAMESPACE, {"metadata": {"name": "kubetune-operator"}})
    binding = cluster.kubectl("create", "clusterrolebinding", "kubetune-operator", "--clusterrole=kubetune-operator",
                              f"--serviceaccount={OPERATOR_NAMESPACE}:kubetune-operator", "--dry-run=client",
                              "-o", "yaml").stdout
    cluster.kubectl("apply", "-f", "-", input=binding)
    token = core.create_namespaced_service_account_token("kubetune-operator", OPERATOR_NAMESPACE, client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=6 * 3600))).status.token
    path = tmp_path_factory.mktemp("operator-auth") / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "e2e", "cluster": {"server": admin_api.configuration.host,
                                                  "certificate-authority": admin_api.configuration.ssl_ca_cert}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "e2e", "user": "operator"}}],
    }))
    return path



@dataclass
class Operator:
    """`kubetune operator` as a subprocess, started, killed and restarted by tests."""

    cluster: Cluster
    kubeconfig: Path
    log_dir: Path
    metrics_port: int = field(default_factory=free_port)
    liveness_port: int = field(default_factory=free_port)
    priority: int = 100
    identity: str = "kubetune-e2e-operator"
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.identity}.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "POD_ID": self.identity,
               "PYTHONUNBUFFERED": "1"}
        args = [str(VENV_BIN / "kubetune"), "operator", "--all-namespaces", "--peering", "kubetune-e2e",
                "--priority", str(self.priority), "--peering-lifetime", "10",
                "--metrics-port", str(self.metrics_port), "--liveness-port", str(self.liveness_port),
                "--trainer-image", "ghcr.io/kubetune/trainer:e2e", "--image-pull-policy", "Never",
                "--validation-toleration", "kwok.x-k8s.io/node:NoSchedule", "--progress-interval", "1"]
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts}: {' '.join(args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("the operator's liveness endpoint", self._alive, timeout=60)

    def _alive(self) -> bool:
        return healthy(self.proc, self.liveness_port, self.log)

    def kill(self) -> None:
        """SIGKILL: no finalizers run, no status is written on the way out."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the operator's /metrics: (name, sorted labels) -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def operator(cluster: Cluster, operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """One `kubetune operator --all-namespaces` for the session (tests that kill it restart it)."""
    op = Operator(cluster, operator_kubeconfig, tmp_path_factory.mktemp("operator"))
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"operator log: {op.log}")


@pytest.fixture
def running_operator(operator: Operator) -> Operator:
    operator.ensure_running()
    return operator


# --- storage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    """A namespace whose pods must meet PodSecurity `restricted`, with two bound claims,
    `models` and `data`, whose contents live under pvc_root/<claim>/ on this machine."""

    namespace: str
    pvc_root: Path


@pytest.fixture(scope="module")
def workspace(admin_api: client.ApiClient, operator_crds: bool, tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> Iterator[Workspace]:
    """One per test module: binding a claim takes the PV controller a resync period (~15 s).
    A module may lower the PodSecurity level with a module-level POD_SECURITY."""
    name = f"{request.module.__name__.rsplit('.', 1)[-1].replace('_', '-')[:40]}-{uuid.uuid4().hex[:5]}"
    level = getattr(request.module, "POD_SECURITY", "restricted")
    core = client.CoreV1Api(admin_api)
    root = tmp_path_factory.mktemp("pvc")
    with fresh_namespace(admin_api, name, pod_security=level):
        for claim in ("models", "data"):
            bound_pvc(admin_api, name, claim, root, wait=False)
        for claim in ("models", "data"):
            wait_for(f"PVC {name}/{claim} to bind",
                     lambda: core.read_namespaced_persistent_volume_claim(claim, name).status.phase == "Bound", timeout=90)
        yield Workspace(name, root)


@pytest.fixture
def namespace(workspace: Workspace) -> str:
    """Tests here share their module's workspace namespace (jobs have distinct names)."""
    return workspace.namespace


def bound_pvc(api: client.ApiClient, namespace: str, claim: str, root: Path, wait: bool = True) -> None:
    """A PersistentVolumeClaim bound to a hostPath PersistentVolume on <root>/<claim>, so pods
    that mount it can be scheduled (nothing here provisions volumes dynamically)."""
    core = client.CoreV1Api(api)
    (root / claim).mkdir(parents=True, exist_ok=True)
    pv = f"{namespace}-{claim}"[:50] + "-" + uuid.uuid4().hex[:6]
    core.create_persistent_volume({
        "metadata": {"name": pv, "labels": {"kubetune-e2e": namespace}},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain",
                 "hostPath": {"path": str(root / claim)},
                 "claimRef": {"namespace": namespace, "name": claim}},
    })
    core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "10Gi"}}},
    })
    if wait:
        wait_for(f"PVC {namespace}/{claim} to bind",
                 lambda: core.read_namespaced_persistent_volume_claim(claim, namespace).status.phase == "Bound", timeout=90)


# --- objects ------------------------------------------------------------------------------


def apply(cluster: Cluster, *objects: dict[str, Any], namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects))


def get(api: client.ApiClient, resource: tuple[str, str, str], namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            resource[0], resource[1], namespace, resource[2], name)
        return obj
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def items(api: client.ApiClient, resource: tuple[str, str, str], namespace: str) -> list[dict[str, Any]]:
    rsp = client.CustomObjectsApi(api).list_namespaced_custom_object(resource[0], resource[1], namespace, resource[2])
    return list(rsp["items"])


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return dict(c)
    return {}


def events(api: client.ApiClient, namespace: str, name: str, kind: str = "FineTuneJob") -> list[client.CoreV1Event]:
    out = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind={kind}").items
    return sorted(out, key=lambda e: int(e.metadata.resource_version))  # the order the API server stored them


def stage(name: str, type_: str, uri: str | None, fmt: str | None, *, pod_annotations: dict[str, str] | None = None,
          **extra: Any) -> dict[str, Any]:
    """A stage that runs on the fake GPU nodes (one GPU per node unless `resources` says otherwise)."""
    resources = {"gpusPerNode": 1, "tolerations": [KWOK_TOLERATION], **extra.pop("resources", {})}
    dataset = extra.pop("dataset", None) or {"uri": uri, "format": fmt}
    return {"name": name, "type": type_, "dataset": dataset, "resources": resources, **extra}


def finetunejob(name: str, stages: list[dict[str, Any]], *, annotations: dict[str, str] | None = None,
                **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B"}, "stages": stages,
                 "output": {"uri": f"pvc://models/{name}"}, **spec},
    }
    return body


def pod_annotations(annotations: dict[str, str], stage_name: str | None = None) -> dict[str, str]:
    key = "kubetune.io/pod-annotations" + (f".{stage_name}" if stage_name else "")
    return {key: json.dumps(annotations)}


# --- the stand-in for the kubelet ---------------------------------------------------------


@dataclass
class Kubelet:
    """Runs pods for real on this machine, as the kubelet would, and reports them in pod status."""

    api: client.ApiClient
    pvc_root: Path
    work: Path
    procs: dict[str, tuple[subprocess.Popen[bytes], Path, Path, bool]] = field(default_factory=dict)

    def start(self, namespace: str, name: str, *, pod_ip: str | None = None) -> None:
        """Start the pod's (single) container as a local process; optionally give the pod this IP."""
        core = client.CoreV1Api(self.api)
        pod = self.api.sanitize_for_serialization(core.read_namespaced_pod(name, namespace))
        (container,) = pod["spec"]["containers"]
        root = self.work / name
        root.mkdir(parents=True, exist_ok=True)
        mounts = self._mounts(namespace, pod, container, root)
        termination_log = root / "termination-log"
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = termination_log
        fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"

        def local(value: str) -> str:
            for path, target in sorted(mounts.items(), key=lambda m: -len(m[0])):
                if value == path or value.startswith(path + "/"):
                    return str(target) + value[len(path):]
            return value

        env = {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "HOME": str(root), "LANG": "C.UTF-8",
               "HF_HUB_OFFLINE": "1", "KUBETUNE_CACHE": str(root / "cache")}
        masters = {e["value"] for e in container.get("env") or [] if e["name"] in ("MASTER_ADDR", "PET_MASTER_ADDR")}
        for e in container.get("env") or []:
            if "value" in e:
                value = "127.0.0.1" if e["value"] in masters else local(e["value"])
                env[e["name"]] = value
        env["KUBETUNE_PVC_ROOT"] = str(self.pvc_root)
        command = [sys.executable if c == "python" else local(c) for c in container["command"] + container.get("args", [])]
        log = root / "log.txt"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
        self.procs[f"{namespace}/{name}"] = (proc, termination_log, log, fallback)
        if pod_ip:
            core.patch_namespaced_pod_status(name, namespace, [
                {"op": "replace", "path": "/status/podIP", "value": pod_ip},
                {"op": "replace", "path": "/status/podIPs", "value": [{"ip": pod_ip}]},
            ])

    def _mounts(self, namespace: str, pod: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, Path]:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out: dict[str, Path] = {}
        for m in container.get("volumeMounts") or []:
            v = volumes.get(m["name"], {})
            if "configMap" in v:
                cm = client.CoreV1Api(self.api).read_namespaced_config_map(v["configMap"]["name"], namespace)
                folder = root / "volumes" / m["name"]
                folder.mkdir(parents=True, exist_ok=True)
                for key, text in (cm.data or {}).items():
                    (folder / key).write_text(text)
                out[m["mountPath"]] = folder
            elif "persistentVolumeClaim" in v:
                out[m["mountPath"]] = self.pvc_root / v["persistentVolumeClaim"]["claimName"]
            elif "emptyDir" in v and m["mountPath"] != "/dev/shm":
                (root / "volumes" / m["name"]).mkdir(parents=True, exist_ok=True)
                out[m["mountPath"]] = root / "volumes" / m["name"]
        return out

    def wait(self, namespace: str, name: str, timeout: float = 600) -> int:
        """Wait for the pod's process and write its end into the pod's status; its exit code."""
        proc, termination_log, log, fallback = self.procs.pop(f"{namespace}/{name}")
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"pod {namespace}/{name} ran past {timeout}s; log: {log.read_text()[-3000:]}")
        message = termination_log.read_text()[:4096] if termination_log.exists() else ""
        if code != 0 and not message and fallback:  # the kubelet's FallbackToLogsOnError
            message = log.read_text(errors="replace")[-2048:]
        self.terminate(namespace, name, code, message)
        return code

    def terminate(self, namespace: str, name: str, code: int, message: str = "") -> None:
        core = client.CoreV1Api(self.api)
        pod = core.read_namespaced_pod(name, namespace)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        statuses = [{
            "name": c.name, "image": c.image, "imageID": "", "ready": False, "restartCount": 0, "started": False,
            "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                     "message": message, "startedAt": now, "finishedAt": now}},
        } for c in pod.spec.containers]
        reason = "PodCompleted" if code == 0 else "PodFailed"
        conditions = [{"type": t, "status": "False" if t in ("Ready", "ContainersReady") else "True",
                       "lastTransitionTime": now, **({"reason": reason} if t in ("Ready", "ContainersReady") else {})}
                      for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
        core.patch_namespaced_pod_status(name, namespace, [
            {"op": "replace", "path": "/status/containerStatuses", "value": statuses},
            {"op": "replace", "path": "/status/conditions", "value": conditions},
            {"op": "replace", "path": "/status/phase", "value": "Succeeded" if code == 0 else "Failed"},
        ])

    def log(self, namespace: str, name: str) -> str:
        return (self.work / name / "log.txt").read_text(errors="replace")

    def kill_all(self) -> None:
        for proc, *_ in self.procs.values():
            if proc.poll() is None:
                proc.kill()


@pytest.fixture
def kubelet(admin_api: client.ApiClient, workspace: Workspace, tmp_path: Path) -> Iterator[Kubelet]:
    k = Kubelet(admin_api, workspace.pvc_root, tmp_path / "kubelet")
    try:
        yield k
    finally:
        k.kill_all()


@pytest.fixture(scope="session", autouse=True)
def _cleanup_pvs(admin_api: client.ApiClient) -> Iterator[None]:
    """PersistentVolumes are cluster-wide: delete the ones the tests made."""
    yield
    core = client.CoreV1Api(admin_api)
    for pv in core.list_persistent_volume(label_selector="kubetune-e2e").items:
        core.delete_persistent_volume(pv.metadata.name)
