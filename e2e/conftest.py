"""Fixtures for the end-to-end tests: a real local Kubernetes control plane.

    .venv/bin/python -m pytest e2e

The session builds the binaries (`e2e/cluster/build`, cached outside the repository), starts
the cluster once (`e2e/cluster/up`: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, KWOK fake GPU nodes, the Kubeflow training-operator) and stops it at the end
(`e2e/cluster/down`). With KUBETUNE_REUSE_CLUSTER=1 a cluster that is already up is used
as it is and left running afterwards.
"""

from __future__ import annotations

import contextlib

import os
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client, config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPTS = REPO / "e2e" / "cluster"

# Pods run on KWOK's fake nodes only if they tolerate the nodes' taint.
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}

T = TypeVar("T")


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


def _script(name: str, *args: str, capture: bool = False) -> str:
    proc = subprocess.run(
        [str(CLUSTER_SCRIPTS / name), *args], text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    if proc.returncode != 0:
        pytest.fail(f"e2e/cluster/{name} {' '.join(args)} exited {proc.returncode} (see its output above)")
    return proc.stdout or ""


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local cluster, started once per session (built first, from cache when it can)."""
    reuse = os.environ.get("KUBETUNE_REUSE_CLUSTER") == "1"
    _script("build")
    bin_dir = Path(_script("build", "--print-bin-dir", capture=True).strip())
    if not reuse:
        _script("down")
    last_line = _script("up", capture=True).strip().splitlines()[-1]
    assert last_line.startswith("export KUBECONFIG="), last_line
    kubeconfig = Path(last_line.removeprefix("export KUBECONFIG="))
    try:
        yield Cluster(kubeconfig=kubeconfig, bin_dir=bin_dir, state_dir=kubeconfig.parent)
    finally:
        if not reuse:
            _script("down")


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


def healthy(proc: subprocess.Popen[bytes] | None, port: int, log: Path) -> bool:
    """Whether an operator process answers /healthz on `port`; fails the test if it exited."""
    if proc is not None and proc.poll() is not None:
        pytest.fail(f"the operator exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as rsp:
            return bool(rsp.status == 200)
    except OSError:
        return False
