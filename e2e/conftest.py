"""Fixtures for the end-to-end tests: a real local Kubernetes control plane.

    .venv/bin/python -m pytest e2e

The session builds the binaries (`e2e/cluster/build`, cached outside the repository), starts
the cluster once (`e2e/cluster/up`: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, KWOK fake GPU nodes, the Kubeflow training-operator) in a state folder and on
ports of its own, and stops it at the end (`e2e/cluster/down`); another run's cluster on the
same machine is left alone. With KUBETUNE_REUSE_CLUSTER=1 the cluster in e2e/cluster/up's
default folder is used (started if it is not up) and left running afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client, config

from e2e.s3 import SeaweedFS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPTS = REPO / "e2e" / "cluster"

CHART = REPO / "helm" / "kubetune"

# Pods run on KWOK's fake nodes only if they tolerate the nodes' taint.
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
KSERVE = "github.com/kserve/kserve@v0.15.2"
# The first KServe release whose module has the LLMInferenceService CRD (serving.kserve.io/v1alpha1).
KSERVE_LLM = "github.com/kserve/kserve@v0.16.0"

T = TypeVar("T")
# Control-plane processes this session started again (Cluster.restart).
_RESTARTED: list[subprocess.Popen[bytes]] = []


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60, interval: float = 0.5) -> T:
    """Call `probe` until it returns something truthy and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice), for a local server of one test run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes] | None, grace: float = 30) -> None:
    """Stop a server started in a session of its own (start_new_session): SIGTERM to its process
    group, SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serving_certificate(folder: Path, ca_name: str) -> bytes:
    """A CA named `ca_name` and a serving certificate for 127.0.0.1 signed by it (tls.crt, tls.key) in
    `folder`: what a webhook server on this machine serves; the CA's PEM (the webhooks' caBundle)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "ca.key"),
            "-out", str(folder / "ca.crt"), "-days", "30", "-subj", f"/CN={ca_name}")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "tls.key"),
            "-out", str(folder / "tls.csr"), "-subj", "/CN=127.0.0.1")
    (folder / "tls.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(folder / "tls.csr"), "-CA", str(folder / "ca.crt"), "-CAkey",
            str(folder / "ca.key"), "-CAcreateserial", "-days", "30", "-sha256", "-extfile", str(folder / "tls.ext"),
            "-out", str(folder / "tls.crt"))
    return (folder / "ca.crt").read_bytes()


def go_module_dir(module: str) -> Path:
    """The folder of a Go module (`path@version`) in Go's module cache, downloaded through the
    module proxy when it is not there yet. A failure fails the test: a module the tests need is
    part of the test, and a network blip must not turn into a silent skip."""
    proc = subprocess.run(["go", "mod", "download", "-json", module], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**os.environ, "GOFLAGS": "-mod=mod"})
    info = json.loads(proc.stdout or "{}")
    if "Dir" not in info:
        pytest.fail(f"go mod download {module}: {info.get('Error') or proc.stderr}")
    return Path(info["Dir"])


def kserve_crd() -> Path:
    """KServe's InferenceService CRD, from KServe's Go module."""
    path = go_module_dir(KSERVE) / "config" / "crd" / "full" / "serving.kserve.io_inferenceservices.yaml"
    assert path.is_file(), f"{KSERVE} has no {path.name}"
    return path


def llm_inference_service_crd() -> Path:
    """KServe's LLMInferenceService CRD, from KServe's Go module (KSERVE_LLM)."""
    path = go_module_dir(KSERVE_LLM) / "config" / "crd" / "full" / "llmisvc" / "serving.kserve.io_llminferenceservices.yaml"
    assert path.is_file(), f"{KSERVE_LLM} has no {path.name}"
    return path


@dataclass(frozen=True)
class Cluster:
    """A running local cluster: its admin kubeconfig, binaries and state folder."""

    kubeconfig: Path
    bin_dir: Path
    state_dir: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the cluster's kubectl as the admin; fail the test with its stderr if it fails."""
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def apply_crds(self, *files: Path, timeout: float = 60) -> None:
        """Install CRDs (server-side apply: big schemas overflow the client-side annotation)
        and wait until each is Established."""
        args = [f"--filename={f}" for f in files]
        self.kubectl("apply", "--server-side", "--force-conflicts", *args)
        # `kubectl wait` errors out on a CRD whose status has no conditions yet, so retry it.
        wait_for(
            "CRDs Established",
            lambda: self.kubectl("wait", "--for=condition=Established", "--timeout=10s", *args, check=False).returncode == 0,
            timeout=timeout,
        )

    def restart(self, component: str, down_seconds: float = 0.0, timeout: float = 120) -> None:
        """Kill one of the control plane's processes (`etcd`, `kube-apiserver`, ...) with SIGKILL,
        as a crash or an evicted static pod would end it, leave it down `down_seconds`, start it
        again with the same command line (appending to its log; etcd keeps its data folder) and
        wait until the API server is ready again."""
        pid_file = self.state_dir / "pids" / f"{component}.pid"
        pid = int(pid_file.read_text())
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        os.kill(pid, signal.SIGKILL)
        wait_for(f"{component} to die", lambda: _gone(pid), timeout=30)
        time.sleep(down_seconds)  # the outage itself
        with (self.state_dir / "logs" / f"{component}.log").open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        _RESTARTED.append(proc)  # e2e/cluster/down stops it by its pid file
        pid_file.write_text(f"{proc.pid}\n")
        wait_for(f"the API server ready after {component} restarted", lambda: self.kubectl(
            "get", "--raw=/readyz", check=False, timeout=10).returncode == 0, timeout=timeout)

    def admin_client(self) -> client.ApiClient:
        """A Python client authenticated with the admin's client certificate (system:masters)."""
        api: client.ApiClient = config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]
        return api

    def service_account_client(
        self, namespace: str, name: str, *, expiration_seconds: int = 600
    ) -> client.ApiClient:
        """A Python client authenticated as ServiceAccount `namespace/name`, with a bound token
        the API server issues through the TokenRequest API."""
        with self.admin_client() as admin:
            request = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
            )
            token = client.CoreV1Api(admin).create_namespaced_service_account_token(name, namespace, request)
            host = admin.configuration.host
            ca = admin.configuration.ssl_ca_cert
        cfg = client.Configuration()
        cfg.host = host
        cfg.ssl_ca_cert = ca
        assert token.status is not None and token.status.token
        cfg.api_key = {"authorization": token.status.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)


def webhook_url(hook: dict[str, Any], port: int, ca: bytes) -> dict[str, Any]:
    """A webhook of a manager's manifests, calling https://127.0.0.1:<port><its service path> with `ca`:
    there is no Service network here to reach it through its Service."""
    path = hook["clientConfig"]["service"]["path"]
    return {**hook, "clientConfig": {"url": f"https://127.0.0.1:{port}{path}", "caBundle": base64.b64encode(ca).decode()}}


@dataclass
class Manager:
    """A controller manager built from its Go module and run here against the local cluster (Kueue's,
    KServe's), with webhook configurations that call it: started and waited for, then stopped,
    its webhooks first (with failurePolicy Fail they would refuse their objects once nothing
    answers)."""

    cluster: Cluster
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    name = "manager"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def hooks(self) -> Path:
        return self.root / "webhooks.yaml"

    def launch(self, command: list[str], env: dict[str, str], health: int, webhooks: list[dict[str, Any]],
               timeout: float) -> None:
        """Start `command`, wait until /readyz on `health` answers, then install `webhooks`."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not answers(f"http://127.0.0.1:{health}/readyz"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name} did not get ready (exit {self.proc.returncode}): {self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.hooks.write_text(yaml.safe_dump_all(webhooks))
        self.cluster.kubectl("apply", "-f", str(self.hooks))

    def stop(self) -> None:
        if self.hooks.exists():
            self.cluster.kubectl("delete", "--ignore-not-found", "-f", str(self.hooks), check=False)
        stop_group(self.proc)


def _script(name: str, *args: str, capture: bool = False, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(CLUSTER_SCRIPTS / name), *args], text=True, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE if capture else None,
    )
    if proc.returncode != 0:
        pytest.fail(f"e2e/cluster/{name} {' '.join(args)} exited {proc.returncode} (see its output above)")
    return proc.stdout or ""


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody has reaped yet counts as gone)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


# The ports e2e/cluster/up listens on, each set by KUBETUNE_<name>.
CLUSTER_PORTS = ("ETCD_PORT", "ETCD_PEER_PORT", "APISERVER_PORT", "KCM_PORT", "SCHEDULER_PORT", "KWOK_PORT",
                 "TO_METRICS_PORT", "TO_PROBE_PORT", "TO_WEBHOOK_PORT")


def own_cluster_env(state_dir: Path) -> dict[str, str]:
    """A cluster of this run alone: its own state folder and free ports, so that it neither
    finds nor stops the cluster of another run on the same machine."""
    ports: set[int] = set()
    while len(ports) < len(CLUSTER_PORTS):
        ports.add(free_port())
    env = {f"KUBETUNE_{name}": str(port) for name, port in zip(CLUSTER_PORTS, sorted(ports), strict=True)}
    # the API server's audit log of the training-operator's requests (the operator-scale bench's --audit)
    return {**env, "KUBETUNE_CLUSTER_DIR": str(state_dir), "KUBETUNE_AUDIT_USERS": "training-operator"}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The local cluster, started once per session (built first, from cache when it can), in a
    state folder of its own; stopped at the end. With KUBETUNE_REUSE_CLUSTER=1, the cluster in
    the default folder is used (started if it is not up) and left running."""
    reuse = os.environ.get("KUBETUNE_REUSE_CLUSTER") == "1"
    _script("build")
    bin_dir = Path(_script("build", "--print-bin-dir", capture=True).strip())
    env = {} if reuse else own_cluster_env(tmp_path_factory.mktemp("cluster"))
    try:
        last_line = _script("up", capture=True, env=env).strip().splitlines()[-1]
        assert last_line.startswith("export KUBECONFIG="), last_line
        kubeconfig = Path(last_line.removeprefix("export KUBECONFIG="))
        yield Cluster(kubeconfig=kubeconfig, bin_dir=bin_dir, state_dir=kubeconfig.parent)
    finally:
        if not reuse:
            _script("down", env=env)


@pytest.fixture(scope="session")
def s3(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real S3 server for the session: SeaweedFS, built with the control plane (e2e/s3.py)."""
    server = SeaweedFS(cluster.bin_dir / "seaweedfs", tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def admin_api(cluster: Cluster) -> Iterator[client.ApiClient]:
    """A Python client as the cluster admin, shared by the session."""
    with cluster.admin_client() as api:
        yield api


@contextlib.contextmanager
def fresh_namespace(api: client.ApiClient, name: str, pod_security: str | None = None) -> Iterator[str]:
    """Create namespace `name` (enforcing PodSecurity `pod_security` if given), wait for its
    default ServiceAccount (the ServiceAccount controller makes it; pods need it), delete it after."""
    core = client.CoreV1Api(api)
    labels = {"pod-security.kubernetes.io/enforce": pod_security,
              "pod-security.kubernetes.io/enforce-version": "latest"} if pod_security else None
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    try:
        wait_for(f"ServiceAccount {name}/default",
                 lambda: _exists(lambda: core.read_namespaced_service_account("default", name)))
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture
def namespace(admin_api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    with fresh_namespace(admin_api, f"{base}-{uuid.uuid4().hex[:5]}") as name:
        yield name


def _exists(read: Callable[[], Any]) -> bool:
    try:
        read()
    except client.ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def answers(url: str, timeout: float = 2) -> bool:
    """Whether GET `url` answers 200 (a health, readiness or probe endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:
            return bool(rsp.status == 200)
    except OSError:
        return False


def healthy(proc: subprocess.Popen[bytes] | None, port: int, log: Path) -> bool:
    """Whether an operator process answers /healthz on `port`; fails the test if it exited."""
    if proc is not None and proc.poll() is not None:
        pytest.fail(f"the operator exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    return answers(f"http://127.0.0.1:{port}/healthz", timeout=1)
