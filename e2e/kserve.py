"""KServe for the tests: its controller manager, built from its Go module by e2e/cluster/build
like the control plane, run against the local cluster in RawDeployment mode (no Knative, no
Istio): an InferenceService becomes a Deployment and a Service that KServe itself makes.

It is installed as its own manifests install it, with what a pod would get in their place:
- the CRDs from its module (config/crd/full);
- the `inferenceservice-config` ConfigMap from its module (config/configmap), with the deployment
  mode RawDeployment and no Ingress (the local cluster has no ingress controller): the two
  settings KServe's "raw deployment" install guide changes;
- its webhooks (config/webhook: the InferenceService defaulter and validator, the pod mutator that
  mounts a pvc:// storageUri at /mnt/models, the runtime validators), each pointed at the manager
  on 127.0.0.1 with a certificate made here, since there is no Service network; the manager reads
  the certificate from controller-runtime's default folder under $TMPDIR;
- its own ports, free ones here, and no leader election (its default).
The webhooks have failurePolicy Fail, and the controller takes over every InferenceService in the
cluster: tests that write an InferenceService's status themselves must not run beside it, so it
is started per test module and stopped, webhooks first, at the module's end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from e2e.conftest import KSERVE, Manager, free_port, go_module_dir, serving_certificate, webhook_url

NAMESPACE = "kserve"  # the controller reads its configuration there ($POD_NAMESPACE)


def _config(source: Path) -> dict[str, Any]:
    """KServe's inferenceservice-config ConfigMap, for RawDeployment without an Ingress."""
    config = yaml.safe_load(source.read_text())
    data = config["data"]
    data["deploy"] = json.dumps({**json.loads(data["deploy"]), "defaultDeploymentMode": "RawDeployment"})
    data["ingress"] = json.dumps({**json.loads(data["ingress"]), "disableIngressCreation": True,
                                  "disableIstioVirtualHost": True})
    config["metadata"]["namespace"] = NAMESPACE
    return dict(config)


def _webhooks(source: Path, port: int, ca: bytes) -> list[dict[str, Any]]:
    """KServe's webhook configurations, each webhook calling https://127.0.0.1:<port><path>."""
    out = []
    for doc in yaml.safe_load_all(source.read_text()):
        if not doc:
            continue
        doc["webhooks"] = [webhook_url(hook, port, ca) for hook in doc["webhooks"]]
        doc["metadata"]["name"] = f"kserve-e2e-{doc['metadata']['name']}"
        out.append(doc)
    return out


class KServe(Manager):
    name = "kserve"

    def start(self, timeout: float = 120) -> None:
        module = go_module_dir(KSERVE)
        self.cluster.apply_crds(*sorted((module / "config" / "crd" / "full").glob("serving.kserve.io_*.yaml")))
        self.cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(
            _config(module / "config" / "configmap" / "inferenceservice.yaml")))
        tmp = self.root / "tmp"  # controller-runtime's webhook server reads $TMPDIR/k8s-webhook-server/serving-certs
        ca = serving_certificate(tmp / "k8s-webhook-server" / "serving-certs", "kserve-e2e-ca")
        webhook, health, metrics = free_port(), free_port(), free_port()
        self.launch(
            [str(self.cluster.bin_dir / "kserve"), f"--kubeconfig={self.cluster.kubeconfig}",
             f"--webhook-port={webhook}", f"--health-probe-addr=127.0.0.1:{health}",
             f"--metrics-addr=127.0.0.1:{metrics}"],
            {"POD_NAMESPACE": NAMESPACE, "TMPDIR": str(tmp)},
            health, _webhooks(module / "config" / "webhook" / "manifests.yaml", webhook, ca), timeout)
