"""The chart's monitoring against a real Prometheus, configured by a real
prometheus-operator from the chart's ServiceMonitor, PodMonitor and PrometheusRule, that scraped the operator
(run as the chart's ServiceAccount, through two pipelines and a refused job) and a trainer
(a tiny `kubetune run` job, pretraining then a few GRPO steps, serving its metrics port):

- every query of the Grafana dashboard, and its variables, return data;
- the chart's alert rules load and evaluate; the failed-job alert goes active, not the others;
- `promtool check metrics` finds no naming problem in what the operator and the trainer serve.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from e2e.conftest import CHART, Cluster, wait_for
from e2e.helm.conftest import (
    VENV_BIN,
    ChartOperator,
    TRAINER_JOB,
    Prometheus,
    Release,
    finetunejob,
    run_pipeline,
    stage,
)

TINY = {
    "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": TRAINER_JOB},
    "spec": {
        "model": {"init": {"architecture": "llama", "hiddenSize": 32, "numLayers": 1, "numHeads": 2,
                           "maxPositionEmbeddings": 64, "tokenizer": {"train": {"vocabSize": 300}}}},
        "stages": [{"name": "pretrain", "type": "pretrain",
                    "dataset": {"uri": "file://data/pretrain/train.jsonl", "format": "text"},
                    "hyperparameters": {"maxSteps": 1500, "learningRate": 3.0e-3, "batchSize": 8, "maxLength": 64,
                                        "loggingSteps": 10, "saveSteps": 10000},
                    "resources": {"gpusPerNode": 0}},
                   # GRPO, so the RL panels (mean reward, KL) have a trainer to show. A tiny model's
                   # steps take milliseconds: hundreds of them, each logged, give Prometheus'
                   # 1-second scrapes several seconds to see the RL gauges.
                   {"name": "grpo", "type": "grpo",
                    "dataset": {"uri": "file://data/sft/train.jsonl", "format": "promptCompletion"},
                    "grpo": {"rewardFunctions": ["exactMatch"], "numGenerations": 4, "maxCompletionLength": 4},
                    "hyperparameters": {"maxSteps": 600, "learningRate": 1.0e-4, "batchSize": 8, "loggingSteps": 1,
                                        "saveSteps": 10000},
                    "resources": {"gpusPerNode": 0}}],
    },
}
GPU_ONLY = {"kubetune_trainer_gpu_memory_bytes"}  # the trainer registers it only where CUDA is


@dataclass
class Run:
    prometheus: Prometheus
    start: float
    end: float
    operator_metrics: str
    trainer_metrics: str
    release: Release


def _trainer_snapshot(port: int) -> str | None:
    """The trainer's /metrics once it has logged a step (None before)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as rsp:
            text = rsp.read().decode()
    except OSError:
        return None
    return text if re.search(r"^kubetune_trainer_loss\{.*\} [0-9.]+", text, re.M) else None


@pytest.fixture(scope="module")
def run(cluster: Cluster, release: Release, operator: ChartOperator, restricted_namespace: str,
        first_pipeline: dict[str, Any], prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """While Prometheus scrapes: a trainer runs a tiny stage, the operator runs a second pipeline
    and refuses an invalid job. (The session's first pipeline ran under Prometheus already.)"""
    work = tmp_path_factory.mktemp("trainer")
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(work / "data")],
                   check=True, capture_output=True)
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    port = prometheus.trainer_port
    log = (work / "run.log").open("wb")
    trainer = subprocess.Popen([str(VENV_BIN / "kubetune"), "run", str(work / "tiny.yaml"), "--runs-dir",
                                str(work / "runs"), "--metrics-port", str(port)],
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
    snapshots: list[str] = []  # the trainer's /metrics, read while it trains (for promtool)

    def watch() -> None:
        while trainer.poll() is None:
            if (text := _trainer_snapshot(port)) is not None:
                snapshots.append(text)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        invalid = finetunejob("refused", [stage("sft", "sft", "messages")], output={"uri": "file:///tmp/out"})
        cluster.kubectl("apply", "-n", restricted_namespace, "-f", "-", input=yaml.safe_dump(invalid))
        run_pipeline(cluster, restricted_namespace, "pipe-b")
        assert trainer.wait(timeout=900) == 0, (work / "run.log").read_text()[-3000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
        log.close()
        watcher.join(timeout=5)
    assert snapshots, "the trainer never served a loss on its metrics port"
    snapshot, operator_metrics = snapshots[-1], operator.metrics_text()
    wait_for("Prometheus to hold the operator's last figures and to judge the refused job", lambda: _landed(
        prometheus, _succeeded_stages(operator_metrics)), timeout=60)
    return Run(prometheus, prometheus.started, time.time(), operator_metrics, snapshot, release)


def _succeeded_stages(metrics_text: str) -> float:
    """How many stages the operator reports succeeded, from its own /metrics."""
    return sum(s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples
               if s.name == "kubetune_stage_duration_seconds_count" and s.labels.get("result") == "succeeded")


def _landed(prometheus: Prometheus, succeeded: float) -> bool:
    """Whether Prometheus' latest scrape of the operator has `succeeded` stages, and its rules
    already made the refused job's alert active."""
    result = prometheus.query('sum(kubetune_stage_duration_seconds_count{result="succeeded"})', at=time.time())
    alerts = {a["labels"]["alertname"] for a in prometheus.get("/api/v1/alerts")["alerts"]}
    return bool(result) and float(result[0]["value"][1]) == succeeded and "KubetuneFineTuneJobFailed" in alerts


# --- the dashboard ------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return dict(json.loads((CHART / "files" / "dashboards" / "kubetune.json").read_text()))


def _substitute(expr: str, run: Run) -> str:
    """Grafana's variables as Grafana would fill them: every FineTuneJob and namespace, this operator."""
    service = next(d for d in run.release.manifest if d["kind"] == "Service")["metadata"]["name"]
    values = {"operator_job": service, "namespace": ".*", "finetunejob": ".*", "__rate_interval": "10s",
              "__range": f"{int(run.end - run.start) + 1}s", "__interval": "2s"}
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, expr
    return expr


def _targets() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p['title']} [{t['refId']}]", t) for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _finite(result: list[dict[str, Any]]) -> list[float]:
    values = [float(v) for r in result for _, v in (r.get("values") or [r["value"]])]
    return [v for v in values if math.isfinite(v)]


@pytest.mark.parametrize("target", [t for _, t in _targets()], ids=[name for name, _ in _targets()])
def test_every_dashboard_query_returns_data(run: Run, target: dict[str, Any]) -> None:
    expr = _substitute(target["expr"], run)
    if target.get("instant"):
        result = run.prometheus.query(expr, at=run.end)
    else:
        result = run.prometheus.query_range(expr, run.start, run.end)

    gpu_only = any(m in expr for m in GPU_ONLY)
    if gpu_only and not any(m in run.trainer_metrics for m in GPU_ONLY):
        # No GPU here: the trainer does not register the metric, so there is nothing to show.
        import torch

        assert not torch.cuda.is_available()
        assert result == []
        pytest.skip("GPU-only query: this machine has no CUDA device, so the trainer serves no GPU memory")
    assert _finite(result), f"no data for {expr}"


def test_stage_durations_are_those_of_the_pipelines(run: Run) -> None:
    expr = _substitute('histogram_quantile(0.5, sum by (type, le) (increase(kubetune_stage_duration_seconds_bucket'
                       '{job=~"$operator_job", result="succeeded"}[$__range])))', run)
    result = {r["metric"]["type"]: float(r["value"][1]) for r in run.prometheus.query(expr, at=run.end)}
    assert set(result) == {"pretrain", "sft", "dpo"}
    assert all(0 < v <= run.end - run.start for v in result.values()), result


def test_training_loss_and_throughput_come_from_the_trainer(run: Run) -> None:
    loss = run.prometheus.query_range(f'kubetune_trainer_loss{{finetunejob="{TRAINER_JOB}", stage="pretrain"}}',
                                      run.start, run.end, step=1)
    (series,) = loss
    # the namespace is the trainer pod's, as prometheus-operator's relabelings set it from discovery
    assert series["metric"]["stage"] == "pretrain" and series["metric"]["namespace"] == run.prometheus.trainer_namespace
    # (the gauge reads 0 until the trainer's first logging step sets it)
    values = [float(v) for _, v in series["values"] if float(v) > 0]
    assert len(values) >= 3 and values[-1] < values[0], "the tiny model's loss fell while Prometheus watched"
    tokens = run.prometheus.query_range(f'max(kubetune_trainer_tokens_per_second{{finetunejob="{TRAINER_JOB}"}})',
                                        run.start, run.end)
    assert max(float(v) for _, v in tokens[0]["values"]) > 0


def test_every_dashboard_variable_has_values(run: Run) -> None:
    for var in _dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
        assert m, var["query"]["query"]
        match, label = _substitute(m.group(1), run), m.group(2)
        values = run.prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": match, "start": f"{run.start:.0f}",
                                                                         "end": f"{run.end:.0f}"})
        assert values, f"variable {var['name']}: no values of {label} for {match}"


# --- alerts and metric names ----------------------------------------------------------------


def test_the_charts_alert_rules_load_and_evaluate(run: Run) -> None:
    groups = run.prometheus.get("/api/v1/rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {"KubetuneFineTuneJobFailed", "KubetuneStageStuck", "KubetuneOperatorDown",
                          "KubetuneReconcileErrors"}
    assert {n: r["health"] for n, r in rules.items()} == dict.fromkeys(rules, "ok")
    # The refused job is Failed=True: its alert is pending (for: 1m) or firing; nothing else is.
    active = {a["labels"]["alertname"]: a for a in run.prometheus.get("/api/v1/alerts")["alerts"]}
    assert set(active) == {"KubetuneFineTuneJobFailed"}
    assert active["KubetuneFineTuneJobFailed"]["state"] in ("pending", "firing")
    assert float(active["KubetuneFineTuneJobFailed"]["value"]) >= 1


@pytest.mark.parametrize("source", ["operator", "trainer"])
def test_promtool_check_metrics_finds_no_problem(run: Run, source: str) -> None:
    text = run.operator_metrics if source == "operator" else run.trainer_metrics
    assert "kubetune_" in text

    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)

    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr
