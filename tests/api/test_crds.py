"""The CRDs in crds/ are what kubetune.api renders, and they are structural and documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from kubetune.api import crds
from kubetune.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_the_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds", "--check", "--out", str(ROOT / "crds")]) == 0, capsys.readouterr().out


def test_check_fails_when_a_file_drifts(tmp_path: Path) -> None:
    crds.write(tmp_path)
    target = tmp_path / "kubetune.io_finetunejobs.yaml"
    target.write_text(target.read_text().replace("Stage name", "The stage name"))
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1


def _walk(schema: dict[str, Any], path: str, seen: list[str]) -> None:
    seen.append(path)
    assert "$ref" not in schema and "anyOf" not in schema and "allOf" not in schema, path
    assert "type" in schema or schema.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
    # root.metadata: the API server refuses anything but `type: object` there
    if path.count(".") >= 1 and not path.endswith(("[]", "{}")) and path != "root.metadata":
        assert schema.get("description"), f"{path} has no description"
    for rule in schema.get("x-kubernetes-validations", []):
        celpy.Environment().compile(rule["rule"])  # raises on a malformed rule
        assert rule["message"], path
    for name, sub in schema.get("properties", {}).items():
        _walk(sub, f"{path}.{name}", seen)
    if "items" in schema:
        _walk(schema["items"], f"{path}[]", seen)
    if isinstance(schema.get("additionalProperties"), dict):
        _walk(schema["additionalProperties"], f"{path}{{}}", seen)


@pytest.mark.parametrize("name", sorted(crds.render()))
def test_crd_is_structural_and_documented(name: str) -> None:
    crd = yaml.safe_load((ROOT / "crds" / name).read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    spec = crd["spec"]
    assert spec["group"] == "kubetune.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["categories"] == ["kubetune"] and spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    seen: list[str] = []
    _walk(version["schema"]["openAPIV3Schema"], "root", seen)
    assert len(seen) > 20


def test_short_names_and_printer_columns() -> None:
    rendered = crds.render()
    shorts = {c["spec"]["names"]["kind"]: c["spec"]["names"]["shortNames"] for c in rendered.values()}
    assert shorts == {"FineTuneJob": ["ftj"], "PreferenceDataset": ["prefds"], "ModelAdapter": ["adapter"]}
    ftj = rendered["kubetune.io_finetunejobs.yaml"]["spec"]["versions"][0]["additionalPrinterColumns"]
    by_name = {c["name"]: c for c in ftj}
    assert by_name["Succeeded"]["jsonPath"] == '.status.conditions[?(@.type=="Succeeded")].status'
    assert {"Stage", "Progress", "Succeeded", "Age"} <= set(by_name)


def test_cross_field_rules_are_in_the_schema() -> None:
    text = (ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text()
    for message in (
        "stage names must be unique",
        "set exactly one of spec.model.uri",
        "dataset.preferenceDatasetRef is only for reward, dpo and kto",
        "tuning.lora is only for tuning.method lora or qlora",
        "dataset.format does not suit the stage type",
        "spec.stages is immutable",
    ):
        assert message in text
