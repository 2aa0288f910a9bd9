"""Kueue for the tests: its manager, built from its Go module by e2e/cluster/build like the control
plane, run against the local cluster with the PyTorchJob integration.

It is installed as its own manifests install it, with what a pod would get in their place:
- the CRDs from its module;
- its webhooks (its own kinds' and PyTorchJob's, so a queued PyTorchJob is suspended from its
  creation on), each pointed at the manager on 127.0.0.1 with a certificate made here, since
  there is no Service network;
- a configuration with its ports, the certificate folder and no leader election; the same
  certificate serves its metrics (a pod mounts it at /etc/kueue/metrics/certs; the build reads
  that folder from $KUEUE_METRICS_CERT_DIR instead, e2e/cluster/modules/kueue/main.sed);
- the on-demand visibility API (an aggregated API server of its own) off: nothing here uses it.
The conversion webhooks for the CRDs' old version (v1beta1) are left out: everything here speaks
v1beta2, the stored version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from e2e.conftest import REPO, Manager, free_port, go_module_dir, serving_certificate, webhook_url

MODULE = "sigs.k8s.io/kueue"
NAMESPACE = "kueue-system"


def version() -> str:
    """The Kueue version the wrapper module (e2e/cluster/modules/kueue) builds."""
    for line in (REPO / "e2e" / "cluster" / "modules" / "kueue" / "go.mod").read_text().splitlines():
        parts = line.split()
        if MODULE in parts:
            return parts[parts.index(MODULE) + 1]
    raise AssertionError("e2e/cluster/modules/kueue/go.mod does not require sigs.k8s.io/kueue")


def _webhooks(source: Path, port: int, ca: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, only the webhooks of its own kinds and of PyTorchJobs
    (the others are for integrations this configuration does not enable, so their paths are not
    served), each calling https://127.0.0.1:<port><path>."""
    out = []
    for doc in yaml.safe_load_all(source.read_text()):
        if not doc:
            continue
        kept = []
        for hook in doc["webhooks"]:
            resources = {(g, r) for rule in hook["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
            if all(g == "kueue.x-k8s.io" or r == "pytorchjobs" for g, r in resources):
                kept.append(webhook_url(hook, port, ca))
        doc["metadata"]["name"] = f"kueue-e2e-{doc['metadata']['name']}"
        out.append({**doc, "webhooks": kept})
    return out


class Kueue(Manager):
    name = "kueue"

    def start(self, timeout: float = 120) -> None:
        module = go_module_dir(f"{MODULE}@{version()}")
        crds = sorted((module / "config" / "components" / "crd" / "bases").glob("*.yaml"))
        self.cluster.apply_crds(*crds)
        self.cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        certs = self.root / "certs"
        ca = serving_certificate(certs, "kueue-e2e-ca")
        webhook, health, metrics = free_port(), free_port(), free_port()
        config = self.root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
            "metrics": {"bindAddress": f"127.0.0.1:{metrics}"},
            "webhook": {"port": webhook, "host": "127.0.0.1", "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["kubeflow.org/pytorchjob"]},
        }))
        self.launch(
            [str(self.cluster.bin_dir / "kueue"), f"--config={config}", f"--kubeconfig={self.cluster.kubeconfig}",
             "--feature-gates=VisibilityOnDemand=false"],  # its API server reads certificates at /visibility
            {"KUEUE_METRICS_CERT_DIR": str(certs)},  # see e2e/cluster/modules/kueue/main.sed
            health, _webhooks(module / "config" / "components" / "webhook" / "manifests.yaml", webhook, ca), timeout)
