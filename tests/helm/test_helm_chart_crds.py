"""The chart's CRDs are the repository's: byte-for-byte copies in files/crds/, rendered
unchanged but for labels and the keep annotation, behind crds.install and crds.keep."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from helm_helpers import CHART, REPO, documents, template

SYNC = REPO / "helm" / "sync-crds.sh"


def _sources() -> dict[str, dict]:
    out = {}
    for path in [*sorted((REPO / "crds").glob("*.yaml")), REPO / "e2e" / "operator" / "peering-crds.yaml"]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[doc["metadata"]["name"]] = doc
    return out


def test_chart_copies_equal_the_repository_crds() -> None:
    proc = subprocess.run([str(SYNC), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sync_check_fails_on_drift(tmp_path: Path) -> None:
    """The check above can fail: a copy of the repository with one CRD edited is caught."""
    for rel in ("crds", "e2e/operator", "helm/kubetune/files/crds"):
        (tmp_path / rel).mkdir(parents=True)
    for path in (REPO / "crds").glob("*.yaml"):
        (tmp_path / "crds" / path.name).write_text(path.read_text())
    (tmp_path / "e2e/operator/peering-crds.yaml").write_text((REPO / "e2e/operator/peering-crds.yaml").read_text())
    (tmp_path / "helm").mkdir(exist_ok=True)
    script = tmp_path / "helm" / "sync-crds.sh"
    script.write_text(SYNC.read_text())
    script.chmod(0o755)
    assert subprocess.run([str(script)], capture_output=True).returncode == 0
    assert subprocess.run([str(script), "--check"], capture_output=True).returncode == 0
    crd = tmp_path / "crds" / "kubetune.io_finetunejobs.yaml"
    crd.write_text(crd.read_text().replace("description:", "description: (changed)", 1))

    proc = subprocess.run([str(script), "--check"], capture_output=True, text=True)

    assert proc.returncode == 1 and "kubetune.io_finetunejobs.yaml" in proc.stderr


def test_rendered_crds_are_the_sources_with_labels_and_keep(tmp_path: Path) -> None:
    rendered = {d["metadata"]["name"]: d for d in documents(template({}, tmp=tmp_path).stdout)
                if d["kind"] == "CustomResourceDefinition"}
    sources = _sources()

    assert sorted(rendered) == sorted(sources) == [
        "clusterkopfpeerings.kopf.dev", "finetunejobs.kubetune.io", "kopfpeerings.kopf.dev",
        "modeladapters.kubetune.io", "preferencedatasets.kubetune.io"]
    for name, crd in rendered.items():
        assert crd["spec"] == sources[name]["spec"], name
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_crds_keep_off_and_install_off(tmp_path: Path) -> None:
    not_kept = [d for d in documents(template({"crds": {"keep": False}}, tmp=tmp_path).stdout)
                if d["kind"] == "CustomResourceDefinition"]
    assert len(not_kept) == 5
    assert all("helm.sh/resource-policy" not in (d["metadata"].get("annotations") or {}) for d in not_kept)

    none = [d for d in documents(template({"crds": {"install": False}}, tmp=tmp_path).stdout)
            if d["kind"] == "CustomResourceDefinition"]
    assert none == []
    assert list(CHART.glob("crds/*")) == [], "Helm's crds/ folder would bypass crds.install"
