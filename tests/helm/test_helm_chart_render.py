"""The chart lints clean and renders manifests that kubeconform -strict accepts, with every
option on and off; the operator flags it renders are ones `kubetune operator` accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helm_helpers import ALL_ON, CHART, documents, find, helm, kubeconform, merge, template
from kubetune.cli import parser

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "all-on": ALL_ON,
    "namespaced": merge(ALL_ON, {"rbac": {"namespaced": True}, "operator": {"watchNamespaces": ["team-a", "team-b"]}}),
    "minimal": {"crds": {"install": False}, "rbac": {"create": False}, "serviceAccount": {"create": False},
                "networkPolicy": {"enabled": False}, "replicaCount": 1, "operator": {"peering": {"enabled": False}},
                "podDisruptionBudget": {"enabled": False}},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_is_clean(variant: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    import yaml

    values.write_text(yaml.safe_dump(VARIANTS[variant]))
    proc = helm("lint", "--strict", str(CHART), "--namespace", "kubetune-system", "--values", str(values))
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_pass_kubeconform_strict(variant: str, schemas: Path, tmp_path: Path) -> None:
    text = template(VARIANTS[variant], tmp=tmp_path).stdout

    code, problems = kubeconform(text, schemas)

    assert code == 0, "\n".join(f"{p['kind']} {p['name']}: {p['msg']}" for p in problems)
    kinds = {d["kind"] for d in documents(text)}
    if variant == "all-on":
        assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                "Service", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy",
                "PodDisruptionBudget"} <= kinds


def test_kubeconform_refuses_a_misspelt_field(schemas: Path, tmp_path: Path) -> None:
    """The schemas are strict: a typo anywhere (a built-in kind, a CRD-based kind) is an error."""
    text = template(ALL_ON, tmp=tmp_path).stdout
    bad = (text.replace("  revisionHistoryLimit: 5", "  revisionHistoryLimit: 5\n  replicsa: 3")
               .replace("  podMetricsEndpoints:\n  - port: metrics", "  podMetricsEndpoints:\n  - port: metrics\n    honourLabels: true"))

    code, problems = kubeconform(bad, schemas)

    assert code == 1
    assert {(p["kind"], p["status"]) for p in problems} == {("Deployment", "statusInvalid"), ("PodMonitor", "statusInvalid")}
    assert any("replicsa" in p["msg"] for p in problems) and any("honourLabels" in p["msg"] for p in problems)


def test_operator_flags_are_ones_kubetune_operator_accepts(tmp_path: Path) -> None:
    docs = documents(template(ALL_ON, tmp=tmp_path).stdout)
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]

    args = parser().parse_args(container["args"])  # exits (SystemExit) on an unknown flag

    assert container["command"] == ["kubetune"] and args.command == "operator"
    assert args.all_namespaces and args.peering == "kt-kubetune" and args.peering_lifetime == 60
    assert (args.metrics_port, args.liveness_port) == (8080, 8081)
    assert args.trainer_image == "ghcr.io/kubetune/trainer:0.1.0" and args.service_account == "trainer"
    assert args.validation_node_selector == ["pool=cpu"]
    assert args.validation_toleration == ["dedicated=cpu:NoSchedule", "spot"]
    assert not args.no_restricted_security_context and args.run_as_user == 1000
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "healthz": 8081}


def test_namespaced_mode_watches_exactly_its_namespaces(tmp_path: Path) -> None:
    docs = documents(template(VARIANTS["namespaced"], tmp=tmp_path).stdout)
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]

    args = parser().parse_args(container["args"])

    assert args.namespace == ["team-a", "team-b"] and not args.all_namespaces


def test_namespaced_mode_without_namespaces_is_refused(tmp_path: Path) -> None:
    proc = template({"rbac": {"namespaced": True}}, tmp=tmp_path, check=False)
    assert proc.returncode != 0
    assert "rbac.namespaced=true needs operator.watchNamespaces" in proc.stderr


def test_several_standalone_replicas_are_refused(tmp_path: Path) -> None:
    proc = template({"operator": {"peering": {"enabled": False}}}, tmp=tmp_path, check=False)
    assert proc.returncode != 0 and "set replicaCount to 1" in proc.stderr


def test_operator_pod_meets_pod_security_restricted(tmp_path: Path) -> None:
    """What PodSecurity "restricted" demands (checked for real in e2e/helm), plus a read-only root."""
    pod = find(documents(template({}, tmp=tmp_path).stdout), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
