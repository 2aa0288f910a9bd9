"""The chart's alerts: Prometheus' own promtool checks them and runs a unit test per alert
firing and not firing, on the rules exactly as the chart renders them; every alert links to
its section of docs/runbooks.md.

Needs promtool (e2e/helm/prometheus.sh install: Debian's prometheus package).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from helm_helpers import ALL_ON, REPO, documents, rules_of, template

RUNBOOKS = REPO / "docs" / "runbooks.md"
INSTALL = REPO / "e2e" / "helm" / "prometheus.sh"
OP = {"job": "kt-kubetune-metrics", "namespace": "kubetune-system"}
RUNBOOK = "https://github.com/kubetune/kubetune/blob/main/docs/runbooks.md#"


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def alert(name: str, at: str, firing: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": firing}


# Each case: (alert, fires?, input series, [alert checks]).
CASES: list[tuple[str, bool, list[dict[str, str]], list[dict[str, Any]]]] = [
    ("KubetuneFineTuneJobFailed", True, [
        series("kubetune_finetunejobs", "0 1 1 1 1 1", condition="Failed", pod="op-0", **OP),
        series("kubetune_finetunejobs", "0 0 0 0 0 0", condition="Failed", pod="op-1", **OP),  # a standby
    ], [alert("KubetuneFineTuneJobFailed", "4m", [{
        "exp_labels": {"severity": "warning", **OP},
        "exp_annotations": {
            "summary": "1 FineTuneJob(s) failed.",
            "description": "1 FineTuneJob(s) run by the kubetune operator kubetune-system/kt-kubetune-metrics have the "
                           "condition Failed=True: they will run no further stage. The Failed condition of each says "
                           "which stage failed and why; deleting or fixing the jobs clears this alert.",
            "runbook_url": RUNBOOK + "kubetunefinetunejobfailed"}}])]),
    ("KubetuneFineTuneJobFailed", False, [
        series("kubetune_finetunejobs", "0 0 0 0 0 0", condition="Failed", pod="op-0", **OP),
        series("kubetune_finetunejobs", "1 1 1 1 1 1", condition="Succeeded", pod="op-0", **OP),
        series("kubetune_finetunejobs", "1 1 1 1 1 1", condition="Failed", pod="x", job="another-operator",
               namespace="elsewhere"),
    ], [alert("KubetuneFineTuneJobFailed", "4m", [])]),
    ("KubetuneStageStuck", True, [
        series("kubetune_trainer_step", "0+10x10 100x60", finetunejob="chat", stage="sft", namespace="team-a",
               pod="chat-sft-master-0"),
        series("kubetune_trainer_total_steps", "1000x70", finetunejob="chat", stage="sft", namespace="team-a",
               pod="chat-sft-master-0"),
    ], [alert("KubetuneStageStuck", "38m", []),  # the last step was 28 minutes ago
        alert("KubetuneStageStuck", "50m", [{
            "exp_labels": {"severity": "warning", "finetunejob": "chat", "stage": "sft", "namespace": "team-a",
                           "pod": "chat-sft-master-0"},
            "exp_annotations": {
                "summary": "Stage sft of FineTuneJob team-a/chat made no progress for 30m.",
                "description": "The trainer of stage sft of FineTuneJob team-a/chat (pod chat-sft-master-0) has been "
                               "at optimizer step 100 for 30m without finishing another one: a hung collective "
                               "(NCCL), a stalled storage read, or a step far slower than expected.",
                "runbook_url": RUNBOOK + "kubetunestagestuck"}}])]),
    ("KubetuneStageStuck", False, [
        # steady progress
        series("kubetune_trainer_step", "0+1x70", finetunejob="a", stage="sft", namespace="team-a", pod="a-0"),
        series("kubetune_trainer_total_steps", "1000x70", finetunejob="a", stage="sft", namespace="team-a", pod="a-0"),
        # finished: at its last step
        series("kubetune_trainer_step", "0+100x10 1000x60", finetunejob="b", stage="sft", namespace="team-a", pod="b-0"),
        series("kubetune_trainer_total_steps", "1000x70", finetunejob="b", stage="sft", namespace="team-a", pod="b-0"),
        # still loading the model: no step planned yet
        series("kubetune_trainer_step", "0x70", finetunejob="c", stage="sft", namespace="team-a", pod="c-0"),
        series("kubetune_trainer_total_steps", "0x70", finetunejob="c", stage="sft", namespace="team-a", pod="c-0"),
        # started 20 minutes ago, no step since: too early to tell
        series("kubetune_trainer_step", "_x50 0x20", finetunejob="d", stage="sft", namespace="team-a", pod="d-0"),
        series("kubetune_trainer_total_steps", "_x50 500x20", finetunejob="d", stage="sft", namespace="team-a", pod="d-0"),
    ], [alert("KubetuneStageStuck", "70m", [])]),
    ("KubetuneOperatorDown", True, [
        series("up", "1 1 0 0 0 0 0 0 0 0 0", pod="op-0", **OP),
        series("up", "1 1 1 0 0 0 0 0 0 0 0", pod="op-1", **OP),
    ], [alert("KubetuneOperatorDown", "4m", []),  # down for 2 minutes only
        alert("KubetuneOperatorDown", "10m", [{
            "exp_labels": {"severity": "critical"},
            "exp_annotations": {
                "summary": "No kubetune operator replica is up.",
                "description": "Prometheus has scraped no replica of the kubetune operator (job kt-kubetune-metrics "
                               "in namespace kubetune-system) for 5m: FineTuneJobs get no new stages, no status "
                               "updates and no clean-up until one is back.",
                "runbook_url": RUNBOOK + "kubetuneoperatordown"}}])]),
    ("KubetuneOperatorDown", True, [  # never scraped at all (no target): absent
        series("up", "1x10", pod="x", job="something-else", namespace="kubetune-system"),
    ], [alert("KubetuneOperatorDown", "10m", [{
        "exp_labels": {"severity": "critical"},
        "exp_annotations": {
            "summary": "No kubetune operator replica is up.",
            "description": "Prometheus has scraped no replica of the kubetune operator (job kt-kubetune-metrics "
                           "in namespace kubetune-system) for 5m: FineTuneJobs get no new stages, no status "
                           "updates and no clean-up until one is back.",
            "runbook_url": RUNBOOK + "kubetuneoperatordown"}}])]),
    ("KubetuneOperatorDown", False, [  # one replica of two is enough
        series("up", "1 1 0 0 0 0 0 0 0 0 0", pod="op-0", **OP),
        series("up", "1x10", pod="op-1", **OP),
    ], [alert("KubetuneOperatorDown", "10m", [])]),
    ("KubetuneReconcileErrors", True, [
        series("kubetune_reconcile_errors_total", "0+2x30", kind="FineTuneJob", error="unexpected", pod="op-0", **OP),
    ], [alert("KubetuneReconcileErrors", "10m", []),  # not for long enough yet
        alert("KubetuneReconcileErrors", "25m", [{
            "exp_labels": {"severity": "warning", "kind": "FineTuneJob", **OP},
            "exp_annotations": {
                "summary": "The kubetune operator keeps failing to reconcile FineTuneJob objects.",
                "description": "Reconciles of FineTuneJob objects by the kubetune operator "
                               "kubetune-system/kt-kubetune-metrics have failed with unexpected errors (33.33m per "
                               "second) for 15m: the API server refusing a request (RBAC, admission), a missing "
                               "CRD, or a bug. The objects concerned make no progress.",
                "runbook_url": RUNBOOK + "kubetunereconcileerrors"}}])]),
    ("KubetuneReconcileErrors", False, [
        # invalid specs are the user's to fix (KubetuneFineTuneJobFailed tells them), not the operator's
        series("kubetune_reconcile_errors_total", "0+2x30", kind="FineTuneJob", error="permanent", pod="op-0", **OP),
        # one blip, then no more errors
        series("kubetune_reconcile_errors_total", "0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
               kind="ModelAdapter", error="unexpected", pod="op-0", **OP),
    ], [alert("KubetuneReconcileErrors", "25m", [])]),
]


@pytest.fixture(scope="module")
def promtool() -> str:
    if not shutil.which("promtool"):
        subprocess.run([str(INSTALL), "install"], check=True)
    path = shutil.which("promtool")
    assert path, "promtool is missing: run e2e/helm/prometheus.sh install (as root) or install Prometheus"
    return path


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "kubetune-rules.yaml"
    path.write_text(yaml.safe_dump(rules_of(documents(template(ALL_ON, tmp=tmp_path).stdout)), sort_keys=False))
    return path


def _alerts(rules_file: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(rules_file.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules_passes(promtool: str, rules_file: Path) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 4 rules found" in proc.stdout


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{a}-{'fires' if f else 'quiet'}-{i}" for i, (a, f, _, _) in enumerate(CASES)])
def test_promtool_test_rules(promtool: str, rules_file: Path, case: int) -> None:
    _, _, inputs, checks = CASES[case]
    tests = {"rule_files": [str(rules_file)], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": inputs, "alert_rule_test": checks}]}
    test_file = rules_file.parent / "test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))

    proc = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)

    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_case(rules_file: Path) -> None:
    names = {a["alert"] for a in _alerts(rules_file)}
    assert names == {a for a, fires, _, _ in CASES if fires} == {a for a, fires, _, _ in CASES if not fires}


def test_promtool_notices_a_wrong_expectation(promtool: str, rules_file: Path) -> None:
    """The unit tests above can fail: expecting the failed-job alert where nothing failed does."""
    tests = {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": CASES[1][2],
        "alert_rule_test": [alert("KubetuneFineTuneJobFailed", "4m", CASES[0][3][0]["exp_alerts"])]}]}
    test_file = rules_file.parent / "test-wrong.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))

    proc = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)

    assert proc.returncode == 1 and "FAILED" in proc.stdout + proc.stderr


def _anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings."""
    out = set()
    for line in RUNBOOKS.read_text().splitlines():
        if line.startswith("## "):
            out.add(re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-"))
    return out


def test_every_alert_has_summary_description_and_a_runbook_section(rules_file: Path) -> None:
    anchors = _anchors()
    for rule in _alerts(rules_file):
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        url = annotations["runbook_url"]
        assert url.startswith("https://") and url.split("#")[0].endswith("docs/runbooks.md"), url
        assert url.split("#")[1] in anchors, f"{rule['alert']}: no section #{url.split('#')[1]} in docs/runbooks.md"
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
    section = RUNBOOKS.read_text().split("## ")[1:]
    assert all(s.count("**Meaning.**") == s.count("**Diagnosis.**") == s.count("**Fix.**") == 1 for s in section)


def test_each_alert_can_be_turned_off(tmp_path: Path) -> None:
    values = {"prometheusRule": {"enabled": True, "alerts": {"stageStuck": {"enabled": False}}}}
    rules = rules_of(documents(template(values, tmp=tmp_path).stdout))
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert names == ["KubetuneFineTuneJobFailed", "KubetuneOperatorDown", "KubetuneReconcileErrors"]
