"""The stand-in kubelet (conftest's `Kubelet`) keeps the promises the trainer pods rely on: a
read-only root filesystem with writable volumes, and variables from Secrets, ConfigMaps and pod
fields. The other e2e tests trust it to run pods as a kubelet would; this is where it is held
to that.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_kubelet.py

(What it does not reproduce is listed in conftest.py's docstring.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubernetes import client

from e2e.conftest import KWOK_TOLERATION, wait_for
from e2e.operator.conftest import HOLD, Kubelet, Workspace

# Writes what it found into its termination message, a JSON object. (The stand-in maps paths
# in variables and arguments to local folders, not paths inside a program, hence the variables.)
PROBE = """
import json, os
found = {name: os.environ.get(name) for name in ("FROM_SECRET", "FROM_CONFIGMAP", "S3_KEY", "POD_NAME", "POD_NAMESPACE",
                                                "APP_LABEL", "MISSING_OPTIONAL")}
def writes(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return True
    except OSError as e:
        return e.strerror
found["scratch"] = writes(os.environ["SCRATCH"] + "/ok")
found["config"] = writes(os.environ["CONFIG"] + "/new")
found["root"] = writes(os.path.join(os.getcwd(), "escape"))
found["outside"] = writes(os.environ["OUTSIDE"])
with open(os.environ["TERMINATION_LOG"], "w") as f:
    json.dump(found, f)
"""


def probe_pod(name: str, read_only_root: bool, outside: Path) -> dict[str, Any]:
    """A pod that PodSecurity "restricted" admits, held Running by KWOK until the stand-in runs it."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "probe"}, "annotations": HOLD},
        "spec": {
            "restartPolicy": "Never", "tolerations": [KWOK_TOLERATION],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "config", "configMap": {"name": "probe"}}],
            "containers": [{
                "name": "probe", "image": "ghcr.io/kubetune/trainer:e2e", "command": ["python", "-c", PROBE],
                "securityContext": {"readOnlyRootFilesystem": read_only_root, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}, {"name": "config", "mountPath": "/config"}],
                "envFrom": [{"secretRef": {"name": "probe"}}, {"configMapRef": {"name": "probe"}},
                            {"secretRef": {"name": "not-there", "optional": True}}],
                "env": [
                    {"name": "SCRATCH", "value": "/scratch"}, {"name": "CONFIG", "value": "/config"},
                    {"name": "TERMINATION_LOG", "value": "/dev/termination-log"},
                    {"name": "OUTSIDE", "value": str(outside)},  # a folder of this machine the pod does not mount
                    {"name": "S3_KEY", "valueFrom": {"secretKeyRef": {"name": "probe", "key": "FROM_SECRET"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "APP_LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "MISSING_OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "probe", "key": "nope",
                                                                                "optional": True}}},
                ],
            }],
        },
    }


def run_probe(admin_api: client.ApiClient, kubelet: Kubelet, namespace: str, name: str, read_only_root: bool,
              outside: Path) -> dict[str, Any]:
    core = client.CoreV1Api(admin_api)
    core.create_namespaced_pod(namespace, probe_pod(name, read_only_root, outside))
    wait_for(f"pod {name} to run", lambda: core.read_namespaced_pod(name, namespace).status.phase == "Running", timeout=90)
    kubelet.start(namespace, name)
    assert kubelet.wait(namespace, name, timeout=120) == 0, kubelet.log(namespace, name)
    terminated = core.read_namespaced_pod(name, namespace).status.container_statuses[0].state.terminated
    return dict(json.loads(terminated.message))


def test_the_stand_in_runs_a_pod_with_its_variables_and_a_read_only_root(
    admin_api: client.ApiClient, workspace: Workspace, kubelet: Kubelet, tmp_path: Path
) -> None:
    ns, core = workspace.namespace, client.CoreV1Api(admin_api)
    core.create_namespaced_secret(ns, {"metadata": {"name": "probe"}, "stringData": {"FROM_SECRET": "s3cr3t"}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "probe"}, "data": {"FROM_CONFIGMAP": "c0nf"}})

    found = run_probe(admin_api, kubelet, ns, "probe-ro", read_only_root=True, outside=tmp_path / "ro")
    control = run_probe(admin_api, kubelet, ns, "probe-rw", read_only_root=False, outside=tmp_path / "rw")

    assert {k: found[k] for k in ("FROM_SECRET", "FROM_CONFIGMAP", "S3_KEY", "POD_NAMESPACE", "APP_LABEL")} == {
        "FROM_SECRET": "s3cr3t", "FROM_CONFIGMAP": "c0nf", "S3_KEY": "s3cr3t", "POD_NAMESPACE": ns, "APP_LABEL": "probe"}
    assert found["POD_NAME"] == "probe-ro" and found["MISSING_OPTIONAL"] is None
    # the emptyDir is writable; the ConfigMap, the working folder and the rest of this machine are not
    assert found["scratch"] is True
    assert found["config"] == found["root"] == found["outside"] == "Read-only file system"
    assert not (tmp_path / "ro").exists()
    # without readOnlyRootFilesystem the same pod may write outside its volumes (ConfigMaps stay read-only)
    assert control["scratch"] is True and control["root"] is True and control["outside"] is True
    assert control["config"] == "Read-only file system"
