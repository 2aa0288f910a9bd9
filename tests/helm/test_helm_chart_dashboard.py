"""The Grafana dashboard ConfigMap: labelled for Grafana's sidecar, valid dashboard JSON, and
every query names only metrics the operator or the trainer serves (e2e/helm runs the queries
against a real Prometheus)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from helm_helpers import CHART, documents, find, template
from kubetune_trainer.callbacks import RL_FIGURES

SUFFIXES = ("_bucket", "_count", "_sum")


def _dashboard(tmp_path: Path, values: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    cm = find(documents(template(values or {"dashboards": {"enabled": True}}, tmp=tmp_path).stdout), "ConfigMap")
    return cm, json.loads(cm["data"]["kubetune.json"])


def _served_metrics() -> set[str]:
    """Metric names the operator and the trainer register (counters with their _total)."""
    from kubetune import metrics
    from kubetune_trainer.callbacks import Metrics

    trainer = Metrics("job", "stage", port=0)
    for key in RL_FIGURES:  # registered when an RL stage first reports them
        trainer.set_rl(key, 0.0)
    families = [*metrics.REGISTRY.collect(), *trainer.registry.collect()]
    names = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    return names | {"kubetune_trainer_gpu_memory_bytes"}  # registered only where CUDA is (see the last test)


def test_configmap_is_labelled_for_grafana_and_holds_the_dashboard(tmp_path: Path) -> None:
    cm, dashboard = _dashboard(tmp_path, {"dashboards": {"enabled": True, "namespace": "monitoring",
                                                         "additionalLabels": {"team": "ml"}}})

    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["labels"]["team"] == "ml"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert dashboard == json.loads((CHART / "files" / "dashboards" / "kubetune.json").read_text())
    assert dashboard["uid"] == "kubetune" and dashboard["title"] == "kubetune"


def test_panels_cover_jobs_stages_training_gpu_and_operator(tmp_path: Path) -> None:
    _, dashboard = _dashboard(tmp_path)
    titles = {p["title"] for p in dashboard["panels"] if p["type"] != "row"}
    assert {"FineTuneJobs by condition", "Stage duration by type (p50, p90)", "Training loss", "Tokens per second",
            "GPU memory", "Operator replicas up", "Reconciles", "Reconcile errors"} <= titles
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert panel.get("description"), panel["title"]


def test_queries_name_only_served_metrics(tmp_path: Path) -> None:
    _, dashboard = _dashboard(tmp_path)
    served = _served_metrics() | {"up"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    named = set()
    for expr in exprs:
        for name in re.findall(r"\b(kubetune_[a-z_]+|up)\s*[{\[(]", expr):
            named.add(name)

    unknown = {n for n in named if n not in served and not (n.endswith(SUFFIXES) and n.rsplit("_", 1)[0] in served)}

    assert unknown == set()
    assert {"kubetune_finetunejobs", "kubetune_stage_duration_seconds_bucket", "kubetune_trainer_loss",
            "kubetune_trainer_tokens_per_second", "kubetune_trainer_gpu_memory_bytes", "up"} <= named


def test_gpu_memory_metric_is_the_trainers() -> None:
    """The GPU panel's metric is the one kubetune_trainer.callbacks registers on a GPU machine."""
    source = (CHART.parents[1] / "trainer-image" / "kubetune_trainer" / "callbacks.py").read_text()
    assert 'gauge("gpu_memory_bytes"' in source
