"""The operator's RBAC grants only what operator/kubetune uses (the API server enforcing it
is e2e/helm's business): no wildcards, no Secrets, no exec, no RBAC, no foreign CRDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helm_helpers import ALL_ON, documents, merge, template

# (group, resource) -> verbs, exactly as the operator's code needs them.
EXPECTED = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("kubetune.io", "preferencedatasets"): {"get", "list", "watch", "patch"},
    ("kubetune.io", "modeladapters"): {"get", "list", "watch", "patch", "create"},
    ("kubetune.io", "finetunejobs/status"): {"patch"},
    ("kubetune.io", "preferencedatasets/status"): {"patch"},
    ("kubetune.io", "modeladapters/status"): {"patch"},
    ("kubetune.io", "finetunejobs/finalizers"): {"update"},
    ("kubetune.io", "preferencedatasets/finalizers"): {"update"},
    ("kubetune.io", "modeladapters/finalizers"): {"update"},
    ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "create", "deletecollection"},
    ("batch", "jobs"): {"get", "list", "watch", "create"},
    ("", "pods"): {"get", "list"},
    ("", "events"): {"create", "list"},
    ("serving.kserve.io", "inferenceservices"): {"get", "list", "watch", "create", "update", "delete"},
    ("serving.kserve.io", "llminferenceservices"): {"get", "list", "watch", "create", "update", "delete"},
    ("kueue.x-k8s.io", "workloads"): {"get", "list", "patch"},
}


def _grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _operator_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"].endswith(("-operator", "-discovery"))]


def test_cluster_mode_grants_exactly_what_the_operator_uses(tmp_path: Path) -> None:
    docs = documents(template(ALL_ON, tmp=tmp_path).stdout)
    (role,) = _operator_roles(docs)
    assert role["kind"] == "ClusterRole"

    grants = _grants(role["rules"])

    assert {k: v for k, v in grants.items() if k[0] not in ("kopf.dev", "apiextensions.k8s.io")} == EXPECTED
    assert grants[("kopf.dev", "clusterkopfpeerings")] == {"list", "watch", "create", "get", "patch"}
    assert grants[("apiextensions.k8s.io", "customresourcedefinitions")] == {"list", "watch"}
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"],
                      "resourceNames": ["kt-kubetune"], "verbs": ["get", "patch"]}]
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune-system"}]


def test_nothing_dangerous_is_granted(tmp_path: Path) -> None:
    for values in (ALL_ON, merge(ALL_ON, {"rbac": {"namespaced": True}, "operator": {"watchNamespaces": ["a"]}})):
        for role in _operator_roles(documents(template(values, tmp=tmp_path).stdout)):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["apiGroups"] + rule["resources"], rule
                assert not {"secrets", "pods/exec", "pods/attach", "pods/portforward", "serviceaccounts/token",
                            "nodes", "roles", "rolebindings", "clusterroles", "clusterrolebindings"} & set(rule["resources"])
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_namespaced_mode_has_roles_in_watched_namespaces_only(tmp_path: Path) -> None:
    values = merge(ALL_ON, {"rbac": {"namespaced": True}, "operator": {"watchNamespaces": ["team-a", "team-b"]}})
    docs = documents(template(values, tmp=tmp_path).stdout)
    roles = _operator_roles(docs)

    namespaced = sorted(r["metadata"]["namespace"] for r in roles if r["kind"] == "Role")
    (discovery,) = [r for r in roles if r["kind"] == "ClusterRole"]

    assert namespaced == ["team-a", "team-b"]
    assert _grants(discovery["rules"]) == {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
                                           ("", "namespaces"): {"list", "watch"}}
    role = next(r for r in roles if r["kind"] == "Role")
    grants = _grants(role["rules"])
    assert {k: v for k, v in grants.items() if k[0] != "kopf.dev"} == EXPECTED
    assert ("kopf.dev", "kopfpeerings") in grants and ("kopf.dev", "clusterkopfpeerings") not in grants
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]


def test_cluster_mode_watching_named_namespaces_grants_their_kopfpeerings(tmp_path: Path) -> None:
    """kopf meets its peers in a KopfPeering of each watched namespace then (e2e runs it live)."""
    docs = documents(template(merge(ALL_ON, {"operator": {"watchNamespaces": ["team-a"]}}), tmp=tmp_path).stdout)
    (role,) = _operator_roles(docs)

    grants = _grants(role["rules"])

    assert role["kind"] == "ClusterRole" and {k: v for k, v in grants.items() if k[0] == "kopf.dev"} == {
        ("kopf.dev", "kopfpeerings"): {"list", "watch", "create", "get", "patch"}}
    assert grants[("", "namespaces")] == {"list", "watch"}  # kopf watches the namespaces it is given
    assert [r["resourceNames"] for r in role["rules"] if r.get("resourceNames")] == [["kt-kubetune"]]


@pytest.mark.parametrize(("value", "group"), [("kserve", "serving.kserve.io"), ("kueue", "kueue.x-k8s.io")])
def test_kserve_and_kueue_rights_can_be_left_out(tmp_path: Path, value: str, group: str) -> None:
    (role,) = _operator_roles(documents(template({"rbac": {value: False}}, tmp=tmp_path).stdout))
    assert not {kind for g, kind in _grants(role["rules"]) if g == group}
