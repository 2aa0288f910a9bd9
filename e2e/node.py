"""A real node of the local cluster, beside the KWOK nodes: Debian's containerd runs the pods, the
kubelet is built from the control plane's own k8s.io/kubernetes module, the pod network is a CNI
bridge from Debian's containernetworking-plugins, and CoreDNS, built from its Go module, is the
cluster's DNS (`e2e/cluster/build --node-tools` builds the kubelet and CoreDNS).

    make test-images        # e2e/images/test_real_node.py starts one for its tests

KWOK only plays pods, and the stand-in kubelet of e2e/operator runs their commands as local
processes; on this node a pod is a pod: its images (imported from podman into containerd, nothing
can be pulled here), its own network namespace and address, its volumes mounted by the kubelet,
its securityContext applied by runc, its Service names resolved by CoreDNS.

What it takes on this machine, each found by trying (see FACTS.md for the first node):
- an address of the node's own that is not 127.0.0.1 (a /32 on the loopback interface): its
  InternalIP, where the kubelet and CoreDNS listen; pods reach it through the bridge's gateway. With 127.0.0.1 the node
  reports no address, and the API server cannot reach the kubelet for logs;
- containerd: `restrict_oom_score_adj` (without it every sandbox fails: the process may not lower an
  OOM score below its own), a sandbox image present locally, runc with cgroupfs (cgroup v1);
- the kubelet: cgroupfs, cgroup v1 allowed, no QoS cgroups and no node-allocatable enforcement, no
  swap check, no image garbage collection (its images cannot be pulled again), ports of its own, a
  client certificate for system:node:<name> signed by the cluster's CA (the Node authorizer admits
  it), and the taint TAINT, so that only pods that tolerate it (the tests') run here;
- CoreDNS serving cluster.local from the API server with the rights its own manifests give it
  (list and watch Services, EndpointSlices, Namespaces and Pods), through a ServiceAccount token.

The containerd root (images, snapshots) is cached in ~/.cache/kubetune/node/ with the image ids it
holds, so an unchanged image is not imported again and a changed one replaces its older version
(the trainer image takes about 13 GB there: its layers and their unpacked snapshots). Everything
else (state, kubelet root, CNI addresses, logs) lives in the node's folder and goes with it. One
node at a time on a machine: its address, bridge and cache are fixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.accounts import service_account_kubeconfig
from e2e.conftest import REPO, Cluster, answers, free_port, stop_group, wait_for

CACHE = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
# The node's own address (a /32 on the loopback interface) and its pods' subnet on the CNI bridge.
ADDRESS, POD_SUBNET, BRIDGE = "10.213.0.1", "10.214.0.0/24", "kt-cni0"
TAINT = {"key": "kubetune.io/real-node", "value": "true", "effect": "NoSchedule"}
TOLERATION = {"key": TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
# The sandbox image and the training-operator's worker init container (e2e/images/node/), tagged
# by the hash of what it is built from.
NODE_IMAGE_DIR = REPO / "e2e" / "images" / "node"
NODE_IMAGE = "localhost/kubetune/node-tools:" + hashlib.sha256(
    b"".join((NODE_IMAGE_DIR / f).read_bytes() for f in ("Containerfile", "nslookup"))).hexdigest()[:12]
CONTAINERD_NS = "k8s.io"  # the CRI plugin's namespace
NODE_PACKAGES = {"containerd": "containerd", "ctr": "containerd", "busybox": "busybox-static", "dash": "dash",
                 "iptables": "iptables", "ip": "iproute2"}


def node_tools_dir() -> Path:
    """The folder of the kubelet and CoreDNS (building them when needed: ~4 minutes each cold)."""
    build = REPO / "e2e" / "cluster" / "build"
    proc = subprocess.run([str(build), "--node-tools"], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"e2e/cluster/build --node-tools failed:\n{proc.stderr[-3000:]}")
    return Path(subprocess.run([str(build), "--print-bin-dir"], capture_output=True, text=True,
                               check=True).stdout.strip())


def install_packages() -> None:
    """Debian's containerd, CNI plugins and static busybox, installed when missing."""
    missing = sorted({pkg for cmd, pkg in NODE_PACKAGES.items() if shutil.which(cmd) is None}
                     | ({"containernetworking-plugins"} if not (CNI_BIN / "bridge").exists() else set()))
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)


def run(*args: str, check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def build_node_image(podman_flags: list[str], work: Path) -> str:
    """NODE_IMAGE, built with podman from scratch, this machine's static busybox and its dash."""
    if run("podman", "image", "exists", NODE_IMAGE, check=False).returncode == 0:
        return NODE_IMAGE
    context = work / "node-image"
    context.mkdir(parents=True, exist_ok=True)
    for source in (shutil.which("busybox") or "/bin/busybox", "/bin/dash", "/lib/x86_64-linux-gnu/libc.so.6",
                   "/lib64/ld-linux-x86-64.so.2", NODE_IMAGE_DIR / "nslookup"):
        shutil.copy(Path(source).resolve(), context / Path(source).name)
    run("podman", "build", *podman_flags, "--network", "none", "--file", str(NODE_IMAGE_DIR / "Containerfile"),
        "--tag", NODE_IMAGE, str(context), timeout=300)
    return NODE_IMAGE


def signed_certificate(folder: Path, name: str, subject: str, ca: Path, ca_key: Path, ext: str) -> tuple[Path, Path]:
    """A key and a certificate for `subject`, signed by the cluster's CA: <folder>/<name>.{key,crt}."""
    key, csr, crt, extfile = (folder / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    extfile.write_text(ext)
    run("openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", subject)
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "7", "-sha256", "-extfile", str(extfile), "-out", str(crt))
    return key, crt


COREDNS_RBAC = [
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kubetune-e2e-coredns", "namespace": "kube-system"}},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "kubetune-e2e-coredns"},
     "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
               {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "kubetune-e2e-coredns"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubetune-e2e-coredns"},
     "subjects": [{"kind": "ServiceAccount", "name": "kubetune-e2e-coredns", "namespace": "kube-system"}]},
]


@dataclass
class RealNode:
    """containerd, the kubelet and CoreDNS as processes of this machine, one node named `name`."""

    cluster: Cluster
    api: client.ApiClient
    root: Path
    bin_dir: Path
    name: str = "kubetune-real-node"
    kubelet_port: int = field(default_factory=free_port)
    healthz_port: int = field(default_factory=free_port)
    dns_ready_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- paths
    @property
    def containerd_root(self) -> Path:
        return CACHE / "node" / "containerd"

    @property
    def socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    def log(self, component: str) -> Path:
        return self.root / f"{component}.log"

    def ctr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ctr", "--address", str(self.socket), "--namespace", CONTAINERD_NS, *args, timeout=timeout, check=check)

    # --- start
    def start(self, images: list[str], podman_flags: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        install_packages()
        self._address()
        self._containerd()
        self._import([build_node_image(podman_flags, self.root), *images])
        self._coredns()
        self._kubelet()

    def _launch(self, component: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with self.log(component).open("ab") as out:
            self.procs[component] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def _alive(self, component: str) -> None:
        proc = self.procs[component]
        if proc.poll() is not None:
            pytest.fail(f"{component} exited {proc.returncode}:\n{self.log(component).read_text(errors='replace')[-4000:]}")

    def _address(self) -> None:
        """The node's address, a /32 on the loopback interface: not 127.0.0.1, so the kubelet reports
        it as the node's InternalIP, and local, so pods reach it through their gateway (this kernel
        has no dummy interfaces)."""
        run("ip", "addr", "replace", f"{ADDRESS}/32", "dev", "lo")

    def _containerd(self) -> None:
        state, cni = self.root / "containerd", self.root / "cni"
        for folder in (state, cni, self.containerd_root):
            folder.mkdir(parents=True, exist_ok=True)
        (cni / "10-kubetune.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "kubetune-e2e",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.root / "cni-addresses")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=2))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (state / "config.toml").write_text(f"""version = 2
root = "{self.containerd_root}"
state = "{state / 'state'}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{state / 'opt'}"
[{cri}]
  sandbox_image = "{NODE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni}"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
""")
        self._launch("containerd", ["containerd", "--config", str(state / "config.toml")])
        wait_for("containerd to answer", lambda: (self._alive("containerd"), self.socket.exists()
                                                   and self.ctr("version", check=False).returncode == 0)[1],
                 timeout=60)

    def _import(self, images: list[str]) -> None:
        """Each image from podman into containerd, unless containerd holds that image id already."""
        marks = self.containerd_root / "kubetune-imported.json"
        imported: dict[str, str] = json.loads(marks.read_text()) if marks.exists() else {}
        present = set(self.ctr("images", "ls", "-q").stdout.split())
        for ref in images:
            image_id = run("podman", "image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
            if imported.get(ref) == image_id and ref in present:
                continue
            # the version it replaces goes first, under both its names (several GB each)
            for name in (ref, f"sha256:{imported.get(ref)}"):
                if name in present:
                    self.ctr("images", "rm", "--sync", name, timeout=600, check=False)
            start = time.monotonic()
            run("bash", "-o", "pipefail", "-c", 'podman save --format docker-archive "$1" | ctr --address "$2" '
                f'--namespace {CONTAINERD_NS} images import -', "import", ref, str(self.socket), timeout=1800)
            imported[ref] = image_id
            marks.write_text(json.dumps(imported, indent=2))
            print(f"imported {ref} into containerd in {time.monotonic() - start:.0f}s")

    def _coredns(self) -> None:
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(COREDNS_RBAC))
        kubeconfig = service_account_kubeconfig(self.api, "kube-system", "kubetune-e2e-coredns",
                                                self.root / "coredns.kubeconfig")
        corefile = self.root / "Corefile"
        corefile.write_text(f""".:53 {{
    bind {ADDRESS}
    errors
    ready 127.0.0.1:{self.dns_ready_port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} operator
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        self._launch("coredns", [str(self.bin_dir / "coredns"), "-conf", str(corefile)])
        wait_for("CoreDNS to be ready", lambda: (self._alive("coredns"),
                                                 answers(f"http://127.0.0.1:{self.dns_ready_port}/ready"))[1], timeout=60)

    def _kubelet(self) -> None:
        pki, work = self.cluster.state_dir / "pki", self.root / "kubelet"
        (work / "pki").mkdir(parents=True, exist_ok=True)
        key, crt = signed_certificate(work / "pki", "client", f"/O=system:nodes/CN=system:node:{self.name}",
                                      pki / "ca.crt", pki / "ca.key", "extendedKeyUsage=clientAuth\n")
        server = yaml.safe_load(self.cluster.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "node",
            "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
            "users": [{"name": "node", "user": {"client-certificate": str(crt), "client-key": str(key)}}],
            "contexts": [{"name": "node", "context": {"cluster": "local", "user": "node"}}],
        }))
        (work / "resolv.conf").write_text("")  # the pods' DNS is the cluster's alone
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": ADDRESS, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.healthz_port,
            # the API server calls it for logs without a client certificate; nothing else reaches this address
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
            "evictionHard": {"memory.available": "100Mi"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "clusterDNS": [ADDRESS], "clusterDomain": "cluster.local", "resolvConf": str(work / "resolv.conf"),
            "podLogsDir": str(self.pod_logs), "registerWithTaints": [TAINT],
            "serializeImagePulls": False, "maxPods": 20,
            "rotateCertificates": False, "serverTLSBootstrap": False,
        }))
        self._launch("kubelet", [
            str(self.bin_dir / "kubelet"), "--config", str(config), "--kubeconfig", str(kubeconfig),
            "--root-dir", str(work / "root"), "--cert-dir", str(work / "pki"),
            "--hostname-override", self.name, "--node-ip", ADDRESS, "--v", "1",
        ])
        core = client.CoreV1Api(self.api)

        def ready() -> bool:
            self._alive("kubelet")
            try:
                node = core.read_node(self.name)
            except client.ApiException:
                return False
            return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        wait_for(f"node {self.name} to be Ready", ready, timeout=180, interval=1)

    # --- stop
    def stop(self) -> None:
        """Pods first (the kubelet stops their containers and releases their addresses), then the
        kubelet, CoreDNS and containerd; then whatever the kubelet had mounted, the bridge and the
        node's address; the Node object last."""
        core = client.CoreV1Api(self.api)
        with contextlib.suppress(Exception):
            pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}").items
            for pod in pods:
                with contextlib.suppress(client.ApiException):
                    core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=5)
            if "kubelet" in self.procs and self.procs["kubelet"].poll() is None:
                with contextlib.suppress(Exception):
                    wait_for("the node's pods to be gone", lambda: not core.list_pod_for_all_namespaces(
                        field_selector=f"spec.nodeName={self.name}").items, timeout=90, interval=1)
        for component in ("kubelet", "coredns"):
            stop_group(self.procs.pop(component, None), grace=20)
        if "containerd" in self.procs:
            for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
            time.sleep(1)
            for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "rm", "--force", container, check=False)
                self.ctr("containers", "rm", container, check=False)
        stop_group(self.procs.pop("containerd", None), grace=20)
        for shim in run("pgrep", "-f", f"containerd-shim.*{self.socket}", check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(shim), signal.SIGKILL)
        self._unmount()
        run("ip", "link", "delete", BRIDGE, check=False)
        run("ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo", check=False)
        with contextlib.suppress(client.ApiException):
            core.delete_node(self.name)

    def _unmount(self) -> None:
        """What is still mounted under the node's folders (volumes, shm, network namespaces), deepest first."""
        roots = (str(self.root), str(self.containerd_root), "/run/netns/cni-", "/var/run/netns/cni-")
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(roots)), key=len, reverse=True):
            run("umount", "--lazy", point, check=False)

    # --- what the tests read
    def pod_log(self, namespace: str, pod: str, container: str, uid: str = "*") -> str:
        """The container's log files as containerd wrote them (each restart of it, in order), of
        the pod with `uid` (any pod of that name by default). The kubelet removes them with the pod."""
        files = sorted(self.pod_logs.glob(f"{namespace}_{pod}_{uid}/{container}/*.log"), key=lambda p: p.stat().st_mtime)
        return "".join(f.read_text(errors="replace") for f in files)
