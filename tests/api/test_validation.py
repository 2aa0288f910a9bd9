"""`kubetune validate`: every invalid manifest is refused with its field path; every example passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.validation import validate_file
from kubetune.cli import main

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _expectation(path: Path) -> tuple[str, str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <field path> :: <message part>'"
    field, fragment = first.removeprefix("# expect: ").split(" :: ")
    return field, fragment


def test_there_are_at_least_25_invalid_manifests() -> None:
    assert len(INVALID) >= 25


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_refused_naming_the_field(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    field, fragment = _expectation(path)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("error: ")]
    assert any(line.startswith(f"error: {field}: ") and fragment in line for line in lines), out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_validates(path: Path) -> None:
    results = validate_file(path)
    assert results, f"{path} holds no documents"
    for label, problems in results:
        assert [p for p in problems if p.severity == "error"] == [], (label, problems)


@pytest.mark.parametrize(
    ("tuning", "extra", "warned_field"),
    [
        ("qlora", "resources: {gpusPerNode: 0}", "spec.stages[0].resources.gpusPerNode"),
        ("full", "hyperparameters: {learningRate: 0.1}", "spec.stages[0].hyperparameters.learningRate"),
    ],
)
def test_unwise_but_supported_settings_warn_without_failing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tuning: str, extra: str, warned_field: str
) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        f"""
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: unwise}}
spec:
  model: {{uri: hf://org/model}}
  stages:
  - name: sft
    type: sft
    dataset: {{uri: file:///d.jsonl, format: promptCompletion}}
    tuning: {{method: {tuning}}}
    {extra}
"""
    )
    assert main(["validate", str(manifest)]) == 0
    assert f"warning: {warned_field}: " in capsys.readouterr().out


def test_a_file_that_is_not_yaml_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    assert main(["validate", str(bad)]) == 1
    assert "not valid YAML" in capsys.readouterr().out
