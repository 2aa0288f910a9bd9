"""The operator-scale benchmark (bench/operator_scale.py) at N = 3, so it cannot rot: every
phase (the steady state for 20 s) runs against this session's cluster and operator, and every
figure comes out."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

from kubernetes import client

from bench import operator_scale
from e2e.conftest import Cluster
from e2e.operator.conftest import Operator


def test_the_operator_scale_benchmark_measures_every_figure(
        cluster: Cluster, admin_api: client.ApiClient, operator_crds: None, running_operator: Operator,
        tmp_path: Path) -> None:
    assert running_operator.proc is not None
    op = operator_scale.OperatorProcess(running_operator.proc.pid, running_operator.metrics_port)

    fig = operator_scale.measure(admin_api, op, 3, prefix=f"bench-{uuid.uuid4().hex[:5]}", timeout=60,
                                 control_plane=lambda: operator_scale.control_plane_cpu_seconds(cluster.state_dir),
                                 training_operator=lambda: operator_scale.training_operator_metrics(cluster.state_dir),
                                 steady=20)

    assert fig.direct_seconds > 0 and fig.kubetune_seconds > 0 and fig.two_stage_seconds > 0
    assert 0 < fig.create_latency[0] <= fig.create_latency[1] < 60
    assert 0 < fig.handoff_latency[0] <= fig.handoff_latency[1] < 60
    assert 10 < fig.phase2_peak_rss_mib <= fig.peak_rss_mib and fig.cpu_seconds > 0 and fig.operator_phase2_cpu > 0
    # the API server at least answered the PyTorchJobs' creates in phase 1, and the cores did that work
    assert fig.control_plane_cpu[0] > 0 and fig.control_plane_cpu[1] > 0 and 0 < fig.cores_busy[0] <= (os.cpu_count() or 1) + 0.1
    # this process created and watched in both phases
    assert all(c > 0 for c in fig.bench_cpu), fig.bench_cpu
    # each phase began once the training-operator had sent what the one before left it to send
    assert all(0 <= d < 300 for d in fig.drain_seconds), fig.drain_seconds
    # the training-operator made each PyTorchJob's pods and wrote its status, in both phases
    for counts in fig.training_operator:
        assert counts.requests >= 3 * 3 and counts.reconciles >= 3 and counts.conflicts >= 0 and counts.errors >= 0
    # 3 + 3 FineTuneJobs, each reconciled at least once per stage
    assert fig.reconciles >= 9 and fig.handler_requests > 0
    # each job's creation woke it, and its PyTorchJob's status woke it again
    assert fig.triggers["change"] >= 6 and fig.triggers["child"] >= 6 and sum(fig.triggers.values()) <= fig.reconciles
    assert not math.isnan(fig.requests_per_reconcile) and fig.requests_per_reconcile > 0
    # each job: at least its GET, its stage's ConfigMap and PyTorchJob, a status write; kopf's on top
    assert fig.requests_per_job[0] >= fig.requests_per_job[1] >= 4
    # the steady state: with --progress-interval 1 the timer looks at each of the 3 held jobs 6 s after
    # its last reconcile (its safety net), which reads the job, its pods and its Events
    assert fig.steady_seconds >= 20 and fig.steady_triggers["timer"] >= 3, (fig.steady_seconds, fig.steady_triggers)
    everything, handlers = fig.steady_requests_per_reconcile
    assert 0 < handlers <= everything, fig.steady_requests_per_reconcile

    # --audit's breakdown (a cluster this session started has the training-operator's audit log):
    # each PyTorchJob's pod, Service and status writes, in both phases, with their time in the API server
    audit_log = cluster.state_dir / "audit.log"
    assert audit_log.exists() or os.environ.get("KUBETUNE_REUSE_CLUSTER") == "1"
    if audit_log.exists():
        for since, until in fig.phase_times:
            audited = operator_scale.audited_requests(audit_log, operator_scale.TRAINING_OPERATOR_USER, since, until)
            counts = audited.counts()
            assert counts.get("create pods", 0) >= 3 and counts.get("create services", 0) >= 3, counts
            assert counts.get("update pytorchjobs/status", 0) >= 3, counts
            assert 0 < audited.latency_ms()[0] <= audited.latency_ms()[1], audited.latency_ms()

    report = tmp_path / "benchmarks.md"
    operator_scale.write(report, [fig], "python -m bench.operator_scale --n 3", "")
    operator_scale.write(report, [fig], "python -m bench.operator_scale --n 3", "")  # replaces its own section
    text = report.read_text()
    assert text.count("## Operator scale") == 1 and "| Throughput ratio" in text and "N = 3" in text
