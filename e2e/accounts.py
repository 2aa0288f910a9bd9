"""A kubeconfig that acts as a ServiceAccount, for the operator the e2e tests and the benchmarks start
(bench/ imports it too, so it is a plain module, not a fixture)."""

from __future__ import annotations

from pathlib import Path

import yaml
from kubernetes import client


def service_account_kubeconfig(api: client.ApiClient, namespace: str, account: str, path: Path) -> Path:
    """Write to `path` a kubeconfig holding a 6-hour token of ServiceAccount namespace/account for the API
    server `api` talks to (its CA certificate included); only its owner may read it."""
    token = client.CoreV1Api(api).create_namespaced_service_account_token(
        account, namespace, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=6 * 3600))).status.token
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "local", "cluster": {"server": api.configuration.host,
                                                    "certificate-authority": api.configuration.ssl_ca_cert}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}],
    }))
    path.chmod(0o600)
    return path
