"""Fixtures for the operator's end-to-end tests: the CRDs, `kubetune operator` as a real
process, bound PVCs, and a stand-in for the kubelet.

    .venv/bin/python -m pytest e2e/operator

KWOK plays pods without running them. Where a test needs a pod to really run (the
PreferenceDataset validator, a training stage), `Kubelet` below does what the kubelet would:
it runs the pod's container command as a local process with the pod's environment (`env`
values, `valueFrom` Secret and ConfigMap keys and pod fields, `envFrom` Secrets and
ConfigMaps; volumes mapped to local folders, the master's address to 127.0.0.1), with a
read-only root filesystem when the container asks for one (a private mount namespace in which
everything but the pod's writable volumes is remounted read-only; read-only volumes and
ConfigMaps stay read-only), and writes the outcome into the pod's status
(containerStatuses[].state.terminated with exit code and termination message, phase Succeeded
or Failed; a process a signal killed exits 128 + its number, as a container runtime reports it).
A pod the training-operator replaces under the same name is run again by calling `start` once
the replacement runs; its log follows its predecessor's. Everything else (Jobs, the
training-operator, the operator) reacts to that status as it would on a real cluster.

What the stand-in does not reproduce: the image (the command runs from this checkout's
virtualenv), the user and group, dropped capabilities and seccomp of the securityContext,
resource limits, `$(VAR)` expansion, and the pod network (ports are this machine's).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
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

from e2e.accounts import service_account_kubeconfig
from e2e.conftest import (
    CHART, KWOK_TOLERATION, REPO, Cluster, answers, free_port, fresh_namespace, healthy, kserve_crd, wait_for,
)
from kubetune.controllers import modeladapter

VENV_BIN = Path(sys.executable).parent
FTJ = ("kubetune.io", "v1alpha1", "finetunejobs")
PREFDS = ("kubetune.io", "v1alpha1", "preferencedatasets")
ADAPTERS = ("kubetune.io", "v1alpha1", "modeladapters")
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")
# Pods carrying this stay Running under KWOK until a test's Kubelet finishes them.
HOLD = {"kwok.kubetune.io/delay": "30m"}


@pytest.fixture(scope="session")
def operator_crds(cluster: Cluster) -> None:
    """kubetune's CRDs (crds/), kopf's peering CRDs and KServe's InferenceService CRD (from its Go
    module: publishing is part of what these tests prove), installed and Established."""
    files = [*sorted((REPO / "crds").glob("*.yaml")), Path(__file__).parent / "peering-crds.yaml", kserve_crd()]
    cluster.apply_crds(*files)


# --- the operator process -----------------------------------------------------------------

# The operator's identity and rights are the Helm chart's own, rendered by `helm template` as a
# release of this name would install them: every e2e test runs under the chart's least privilege,
# and a right the chart lacks fails them.
OPERATOR_RELEASE, OPERATOR_NAMESPACE, PEERING = "kubetune-e2e", "kubetune-e2e-system", "kubetune-e2e"
CHART_RBAC = ("templates/serviceaccount.yaml", "templates/rbac.yaml")
CHART_VALUES: dict[str, Any] = {
    "operator": {"peering": {"name": PEERING}},  # the peering the operators below join
    "rbac": {"aggregateToDefaultRoles": False},  # people's roles, not the operator's
}


def chart_rbac(cluster: Cluster, values_file: Path) -> list[dict[str, Any]]:
    """The operator's ServiceAccount, (Cluster)Roles and bindings as the chart renders them."""
    values_file.write_text(yaml.safe_dump(CHART_VALUES))
    shown = [a for t in CHART_RBAC for a in ("--show-only", t)]
    proc = subprocess.run([str(cluster.bin_dir / "helm"), "template", OPERATOR_RELEASE, str(CHART),
                           "--namespace", OPERATOR_NAMESPACE, "--values", str(values_file), *shown],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"helm template of the chart's RBAC failed: {proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: Cluster, admin_api: client.ApiClient, operator_crds: None,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig holding a token of the chart's ServiceAccount (release kubetune-e2e), bound
    to the chart's ClusterRole and nothing else."""
    work = tmp_path_factory.mktemp("operator-auth")
    docs = chart_rbac(cluster, work / "values.yaml")
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}, docs
    (account,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                                              "metadata": {"name": OPERATOR_NAMESPACE}}))
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return service_account_kubeconfig(admin_api, OPERATOR_NAMESPACE, account, work / "kubeconfig")


@dataclass
class Operator:
    """`kubetune operator` as a subprocess, started, killed and restarted by tests."""

    cluster: Cluster
    kubeconfig: Path
    log_dir: Path
    metrics_port: int = field(default_factory=free_port)
    liveness_port: int = field(default_factory=free_port)
    # where the trainer pods serve their metrics: the stand-in kubelet runs them on this machine
    trainer_metrics_port: int = field(default_factory=free_port)
    priority: int = 100
    identity: str = "kubetune-e2e-operator"
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.identity}.log"

    def operator_args(self) -> list[str]:
        """`kubetune operator ...` as the tests run it (the operator image's test runs the same in a container)."""
        return ["operator", "--all-namespaces", "--peering", PEERING,
                "--priority", str(self.priority), "--peering-lifetime", "10",
                "--metrics-port", str(self.metrics_port), "--liveness-port", str(self.liveness_port),
                "--trainer-metrics-port", str(self.trainer_metrics_port),
                "--trainer-image", "ghcr.io/kubetune/trainer:e2e", "--image-pull-policy", "Never",
                "--validation-toleration", "kwok.x-k8s.io/node:NoSchedule", "--progress-interval", "1"]

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "POD_ID": self.identity, "PYTHONUNBUFFERED": "1"}
        self.launch([str(VENV_BIN / "kubetune"), *self.operator_args()], env, "the operator's liveness endpoint", 60)

    def launch(self, args: list[str], env: dict[str, str] | None, what: str, timeout: float) -> None:
        """Start `args` with its output appended to the log, and wait until the liveness endpoint answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts}: {' '.join(args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(what, self._alive, timeout=timeout)

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


@pytest.fixture(scope="package")
def operator(cluster: Cluster, operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """One `kubetune operator --all-namespaces` for the tests of this package (tests that kill it
    restart it); stopped when they are done, so it never acts beside the Helm tests' operator.
    A request the chart's RBAC refused, anywhere in its log, fails the run."""
    yield from run_operator(Operator(cluster, operator_kubeconfig, tmp_path_factory.mktemp("operator")))


def run_operator(op: Operator) -> Iterator[Operator]:
    """The body of an operator fixture: start `op`, yield it, stop it; a request the chart's RBAC
    refused, anywhere in its log, fails the run."""
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"operator log: {op.log}")
    refused = [line for line in op.log.read_text(errors="replace").splitlines() if "is forbidden: User" in line]
    assert not refused, f"the chart's RBAC refused the operator:\n{refused[0]}"


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
def workspace(admin_api: client.ApiClient, operator_crds: None, tmp_path_factory: pytest.TempPathFactory,
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


def mark_ready(api: client.ApiClient, resource: tuple[str, str, str], namespace: str, name: str) -> dict[str, Any]:
    """Write the status KServe's controller writes once the (LLM)InferenceService `name` serves (for
    tests run without it; test_e2e_operator_kserve.py runs it) and wait for the ModelAdapter of that name to mirror it, through
    the service's watch event or the adapter's resync timer (RESYNC_SECONDS) when the watch missed
    it. Returns the Ready adapter."""
    url = f"http://{name}.{namespace}.example.com"
    client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        *resource[:2], namespace, resource[2], name,
        {"status": {"url": url, "conditions": [{"type": "Ready", "status": "True",
                                                "lastTransitionTime": "2025-01-01T00:00:00Z"}]}})
    adapter = wait_for("the adapter to be Ready", lambda: (a := get(api, ADAPTERS, namespace, name))
                       and condition(a, "Ready").get("status") == "True" and a,
                       timeout=modeladapter.RESYNC_SECONDS * 2 + 30)
    assert adapter["status"]["url"] == url
    return adapter


def running_pod(core: client.CoreV1Api, ns: str, name: str, not_uid: str | None = None) -> str:
    """Wait for pod `name` to run (a replacement: with another uid than `not_uid`); its uid."""
    def probe() -> str | None:
        try:
            pod = core.read_namespaced_pod(name, ns)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise
        ok = pod.status.phase == "Running" and pod.metadata.uid != not_uid and not pod.metadata.deletion_timestamp
        return str(pod.metadata.uid) if ok else None
    return wait_for(f"pod {name} to run" + (" again" if not_uid else ""), probe, timeout=120, interval=0.2)


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

# Runs inside a private mount namespace (unshare): bind the pod's volumes onto themselves, the
# read-only ones read-only; with a read-only root, remount every other mount of this machine
# (but /proc, /sys, /dev) read-only too; then exec the container's command.
# argv: json [writable, read_only, read_only_root], command...
_MOUNTS = """
import json, os, subprocess, sys
writable, read_only, read_only_root = json.loads(sys.argv[1])
def mount(*args):
    subprocess.run(["mount", *args], check=True)
for path in writable + read_only:
    mount("--bind", path, path)
for path in read_only:
    mount("-o", "remount,bind,ro", path)
targets = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], check=True, capture_output=True, text=True).stdout
for target in dict.fromkeys(targets.split()) if read_only_root else ():
    if target not in writable + read_only and not target.startswith(("/proc", "/sys", "/dev")):
        mount("-o", "remount,bind,ro", target)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def in_mount_namespace(command: list[str], writable: list[Path], read_only: list[Path], read_only_root: bool) -> list[str]:
    """`command` with the pod's filesystem view: `read_only` paths may only be read and, with
    `read_only_root`, nothing but the `writable` paths may be written."""
    paths = json.dumps([sorted({str(p) for p in writable}), sorted({str(p) for p in read_only}), read_only_root])
    return ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", _MOUNTS, paths, *command]


def image_entrypoint(image: str) -> list[str]:
    """The ENTRYPOINT of the kubetune image `image` names (its repository's last part: trainer,
    serving, operator), read from its Dockerfile: a container without a command runs it."""
    name = image.rsplit("/", 1)[-1].split(":")[0].split("@")[0]
    dockerfile = {"trainer": "trainer-image", "serving": "serving", "operator": "operator"}.get(name)
    if dockerfile is None:
        pytest.fail(f"the stand-in kubelet knows the entrypoints of kubetune's images only, not {image}")
    for line in (REPO / dockerfile / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            return list(json.loads(line.removeprefix("ENTRYPOINT ")))
    pytest.fail(f"{dockerfile}/Dockerfile has no ENTRYPOINT")


@dataclass
class Kubelet:
    """Runs pods for real on this machine, as the kubelet would, and reports them in pod status."""

    api: client.ApiClient
    pvc_root: Path
    work: Path
    procs: dict[str, tuple[subprocess.Popen[bytes], Path, Path, bool]] = field(default_factory=dict)
    # The pods' node-local ports on this machine: each rendezvous port a PyTorchJob's pods name
    # (the same in every job) maps to a free port here, so runs side by side do not collide.
    ports: dict[tuple[str, str, str], str] = field(default_factory=dict)
    # The ports a pod's container declares (containerPort), each a free port here, where a pod
    # network would give every pod the same numbers on an address of its own: (ns, pod, port) -> port.
    container_ports: dict[tuple[str, str, int], int] = field(default_factory=dict)

    def start(self, namespace: str, name: str, *, pod_ip: str | None = None) -> None:
        """Start the pod's (single) container as a local process; optionally give the pod this IP."""
        core = client.CoreV1Api(self.api)
        pod = self.api.sanitize_for_serialization(core.read_namespaced_pod(name, namespace))
        (container,) = pod["spec"]["containers"]
        root = self.work / name
        root.mkdir(parents=True, exist_ok=True)
        mounts, read_only = self._mounts(namespace, pod, container, root)
        termination_log = root / "termination-log"
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = termination_log
        fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"

        def local(value: str) -> str:
            """`value` with the mount path it is, or ends in after a `=` (`--flag=PATH`, `name=PATH`), on this machine."""
            head, eq, tail = value.rpartition("=")
            if not tail.startswith("/"):
                head, eq, tail = "", "", value
            for path, target in sorted(mounts.items(), key=lambda m: -len(m[0])):
                if tail == path or tail.startswith(path + "/"):
                    return head + eq + str(target) + tail[len(path):]
            return value

        ports = {int(p["containerPort"]): free_port() for p in container.get("ports") or []}
        for port, here in ports.items():
            self.container_ports[(namespace, name, port)] = here

        def port_arg(value: str) -> str:
            """`--flag=PORT` of a declared container port, with the port it has here."""
            head, eq, tail = value.rpartition("=")
            return head + eq + str(ports[int(tail)]) if eq and tail.isdigit() and int(tail) in ports else value

        env = {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "HOME": str(root), "LANG": "C.UTF-8",
               "HF_HUB_OFFLINE": "1", "KUBETUNE_CACHE": str(root / "cache"),
               **self._env_from(namespace, container)}
        masters = {e["value"] for e in container.get("env") or [] if e["name"] in ("MASTER_ADDR", "PET_MASTER_ADDR")}
        for e in container.get("env") or []:
            if "value" in e:
                value = "127.0.0.1" if e["value"] in masters else local(e["value"])
                if e["name"] in ("MASTER_PORT", "PET_MASTER_PORT"):
                    value = self.ports.setdefault((namespace, ",".join(sorted(masters)), e["value"]), str(free_port()))
                env[e["name"]] = value
            elif "valueFrom" in e and (value := self._value_from(namespace, pod, e)) is not None:
                env[e["name"]] = value
        env["KUBETUNE_PVC_ROOT"] = str(self.pvc_root)
        command = [sys.executable if c == "python" else port_arg(local(c))
                   for c in (container.get("command") or image_entrypoint(container["image"])) + container.get("args", [])]
        termination_log.write_text("")  # a replacement pod of the same name starts with none
        command = in_mount_namespace(
            command, writable=[p for p, ro in read_only.items() if not ro] + [termination_log],
            read_only=[p for p, ro in read_only.items() if ro],
            read_only_root=bool((container.get("securityContext") or {}).get("readOnlyRootFilesystem")))
        log = root / "log.txt"
        with log.open("ab") as out:  # a replacement pod of the same name logs on after the one it replaces
            if out.tell():
                out.write(f"\n===== replacement pod uid={pod['metadata']['uid']}\n".encode())
                out.flush()
            proc = subprocess.Popen(command, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
        self.procs[f"{namespace}/{name}"] = (proc, termination_log, log, fallback)
        if pod_ip:
            core.patch_namespaced_pod_status(name, namespace, [
                {"op": "replace", "path": "/status/podIP", "value": pod_ip},
                {"op": "replace", "path": "/status/podIPs", "value": [{"ip": pod_ip}]},
            ])

    def serve(self, namespace: str, name: str, timeout: float = 300) -> int:
        """Start a serving pod and mark it Ready once its readinessProbe (an httpGet) answers 200, as
        the kubelet's prober does; the port its server listens on here."""
        self.start(namespace, name)
        core = client.CoreV1Api(self.api)
        (container,) = core.read_namespaced_pod(name, namespace).spec.containers
        probe = container.readiness_probe.http_get
        port = self.container_ports[(namespace, name, int(probe.port))]
        proc, _, log, _ = self.procs[f"{namespace}/{name}"]

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"serving pod {namespace}/{name} exited {proc.returncode}: {log.read_text()[-3000:]}")
            return answers(f"http://127.0.0.1:{port}{probe.path}", timeout=5)
        wait_for(f"pod {name}'s readiness probe {probe.path}", ready, timeout=timeout, interval=1)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pod = self.api.sanitize_for_serialization(core.read_namespaced_pod(name, namespace))
        conditions = [{**c, "status": "True", "lastTransitionTime": now}
                      if c["type"] in ("Ready", "ContainersReady") else c for c in pod["status"]["conditions"]]
        statuses = [{**c, "ready": True, "started": True} for c in pod["status"]["containerStatuses"]]
        core.patch_namespaced_pod_status(name, namespace, [
            {"op": "replace", "path": "/status/conditions", "value": conditions},
            {"op": "replace", "path": "/status/containerStatuses", "value": statuses},
        ])
        return port

    def _mounts(self, namespace: str, pod: dict[str, Any], container: dict[str, Any],
                root: Path) -> tuple[dict[str, Path], dict[Path, bool]]:
        """(mount path -> local folder, local folder -> whether the pod may only read it)."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out: dict[str, Path] = {}
        read_only: dict[Path, bool] = {}
        for m in container.get("volumeMounts") or []:
            v = volumes.get(m["name"], {})
            if "configMap" in v:
                cm = client.CoreV1Api(self.api).read_namespaced_config_map(v["configMap"]["name"], namespace)
                folder = root / "volumes" / m["name"]
                folder.mkdir(parents=True, exist_ok=True)
                for key, text in (cm.data or {}).items():
                    (folder / key).write_text(text)
                out[m["mountPath"]], read_only[folder] = folder, True  # the kubelet mounts ConfigMaps read-only
            elif "persistentVolumeClaim" in v:
                folder = self.pvc_root / v["persistentVolumeClaim"]["claimName"] / m.get("subPath", "")
                ro = bool(m.get("readOnly") or v["persistentVolumeClaim"].get("readOnly"))
                out[m["mountPath"]], read_only[folder] = folder, read_only.get(folder, True) and ro
            elif "emptyDir" in v and m["mountPath"] != "/dev/shm":  # new with each pod, as the kubelet's
                folder = root / "volumes" / pod["metadata"]["uid"] / m["name"]
                folder.mkdir(parents=True, exist_ok=True)
                out[m["mountPath"]], read_only[folder] = folder, bool(m.get("readOnly"))
        return out, read_only

    def _env_from(self, namespace: str, container: dict[str, Any]) -> dict[str, str]:
        """The variables of the container's envFrom Secrets and ConfigMaps (a missing one that is
        not optional stops the container, as the kubelet's CreateContainerConfigError would)."""
        out: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            kind = "secretRef" if "secretRef" in source else "configMapRef"
            ref = source[kind]
            data = self._data(namespace, kind, ref["name"])
            if data is None and not ref.get("optional"):
                pytest.fail(f"envFrom {kind} {namespace}/{ref['name']} does not exist")
            out.update({source.get("prefix", "") + k: v for k, v in (data or {}).items()})
        return out

    def _value_from(self, namespace: str, pod: dict[str, Any], var: dict[str, Any]) -> str | None:
        """An env variable's valueFrom: a Secret's or ConfigMap's key, or a field of the pod."""
        source = var["valueFrom"]
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in source:
                ref = source[kind]
                value = (self._data(namespace, kind, ref["name"]) or {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    pytest.fail(f"env {var['name']}: {kind} {namespace}/{ref['name']} has no key {ref['key']}")
                return value
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
                return str((pod["metadata"].get(m.group(1)) or {}).get(m.group(2), ""))
            section, _, key = path.partition(".")
            return str((pod.get(section) or {}).get(key, ""))
        pytest.fail(f"env {var['name']}: the stand-in kubelet does not reproduce valueFrom {sorted(source)}")

    def _data(self, namespace: str, kind: str, name: str) -> dict[str, str] | None:
        """A Secret's (decoded) or ConfigMap's data, None when it does not exist."""
        core = client.CoreV1Api(self.api)
        try:
            if kind.startswith("secret"):
                secret = core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            return dict(core.read_namespaced_config_map(name, namespace).data or {})
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def wait(self, namespace: str, name: str, timeout: float = 600) -> int:
        """Wait for the pod's process and write its end into the pod's status; its exit code."""
        proc, termination_log, log, fallback = self.procs.pop(f"{namespace}/{name}")
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"pod {namespace}/{name} ran past {timeout}s; log: {log.read_text()[-3000:]}")
        if code < 0:  # killed by a signal: the container runtime reports 128 + its number
            code = 128 - code
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
        """The pod's output (after it, that of each replacement pod of the same name)."""
        return (self.work / name / "log.txt").read_text(errors="replace")

    def processes(self, namespace: str, name: str) -> list[int]:
        """The pids of the running pod's processes, its container's main process first."""
        proc = self.procs[f"{namespace}/{name}"][0]
        found, i = [proc.pid], 0
        while i < len(found):
            try:
                found += [int(c) for t in Path(f"/proc/{found[i]}/task").iterdir()
                          for c in (t / "children").read_text().split()]
            except OSError:  # gone meanwhile
                pass
            i += 1
        return found

    def stop(self, namespace: str, name: str, grace: float = 30) -> int:
        """The pod was deleted (or its node lost): stop its processes as the kubelet stops a deleted
        pod's containers (SIGTERM, SIGKILL after the grace period); nothing is written to its status."""
        pids = self.processes(namespace, name)
        proc = self.procs.pop(f"{namespace}/{name}")[0]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return proc.wait()

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
        try:
            core.delete_persistent_volume(pv.metadata.name)
        except client.ApiException as e:
            if e.status != 404:  # gone already: the image tests import this fixture, so it can run twice
                raise
