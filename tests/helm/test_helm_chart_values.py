"""values.yaml documents every value, and values.schema.json refuses what would break."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from helm_helpers import CHART, template

VALUES = CHART / "values.yaml"
KUBERNETES_OBJECTS = ("resources.", "podSecurityContext.", "securityContext.", "metrics.podMonitor.namespaceSelector.",
                      "servingRuntime.resources.", "servingRuntime.securityContext.")


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def test_every_value_has_a_comment_above_it() -> None:
    lines = VALUES.read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        nested = rest == "" and i + 1 < len(lines) and lines[i + 1].startswith(" " * (indent + 2))
        if nested and not lines[i + 1].lstrip().startswith("- "):
            continue  # a group of values: each of its leaves carries its own comment
        if path.startswith(KUBERNETES_OBJECTS):
            continue  # inside a Kubernetes object (resources, a securityContext): its parent is documented
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith("#"):
            undocumented.append(path)
    assert undocumented == []


def test_values_are_camel_case() -> None:
    leaves = _leaves(yaml.safe_load(VALUES.read_text()))
    bad = [p for p in leaves if not p.startswith(KUBERNETES_OBJECTS) and not all(re.match(r"^[a-z][A-Za-z0-9]*$", k) for k in p.split("."))]
    assert bad == []


def test_schema_describes_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], values: Any, path: str) -> list[str]:
        missing = []
        if not isinstance(values, dict) or "properties" not in node:
            return missing
        for k, v in values.items():
            sub = node["properties"].get(k)
            if sub is None:
                missing.append(f"{path}{k}")
                continue
            if sub.get("type") != "object" or "properties" not in sub:
                if not sub.get("description"):
                    missing.append(f"{path}{k} (no description)")
            missing += walk(sub, v, f"{path}{k}.")
        return missing

    assert walk(schema, yaml.safe_load(VALUES.read_text()), "") == []


BAD_VALUES = [
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"replicaCount": 0}, "/replicaCount"),
    ({"replicas": 2}, "replicas"),  # a misspelt key is refused, not ignored
    ({"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
    ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"prometheusRule": {"alerts": {"stageStuck": {"window": "half an hour"}}}}, "/prometheusRule/alerts/stageStuck/window"),
    ({"prometheusRule": {"alerts": {"operatorDown": {"severity": "page"}}}}, "/prometheusRule/alerts/operatorDown/severity"),
    ({"trainer": {"securityContext": {"runAsUser": 0}}}, "/trainer/securityContext/runAsUser"),
    ({"trainer": {"validation": {"tolerations": [{"value": "x"}]}}}, "/trainer/validation/tolerations/0"),
    ({"crds": {"install": "yes"}}, "/crds/install"),
    ({"servingRuntime": {"image": {"pullPolicy": "Sometimes"}}}, "/servingRuntime/image/pullPolicy"),
    ({"servingRuntime": {"enable": False}}, "servingRuntime"),  # misspelt: refused, not ignored
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_refuses_a_bad_value(values: dict[str, Any], where: str, tmp_path: Path) -> None:
    proc = template(values, tmp=tmp_path, check=False)

    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert where in proc.stderr, proc.stderr


def test_defaults_and_overrides_are_accepted(tmp_path: Path) -> None:
    proc = template({"replicaCount": 3, "operator": {"watchNamespaces": ["team-a"]},
                     "prometheusRule": {"alerts": {"stageStuck": {"window": "1h30m"}}},
                     "podDisruptionBudget": {"maxUnavailable": "50%"}}, tmp=tmp_path)
    assert "kind: Deployment" in proc.stdout
