"""The operator's Prometheus metrics (served by `kubetune operator --metrics-port`).

Names carry the `kubetune_` prefix and base units; counters end in `_total`; labels are
few and bounded (kind, result, condition, stage type), never object names.

    kubetune_reconciles_total{kind,trigger,result}    reconciles by what woke them (change: the object's own;
                                                      child: a child's event; dataset; timer) and outcome:
                                                      success, retry, error
    kubetune_reconcile_errors_total{kind,error}       failed reconciles: permanent, unexpected
    kubetune_reconcile_duration_seconds{kind}         time spent in one reconcile (histogram)
    kubetune_finetunejobs{condition}                  FineTuneJobs whose condition is True now
    kubetune_stage_duration_seconds{type,result}      wall time of finished stages (histogram)
    kubetune_pytorchjobs_created_total{type}          PyTorchJobs created, by stage type
    kubetune_validation_jobs_created_total            PreferenceDataset validation Jobs created
    kubetune_inferenceservices_applied_total{action}  InferenceServices created or updated
    kubetune_api_requests_total{method}               requests of the handlers to the API server (not kopf's own)
    kubetune_api_throttled_seconds_total              seconds the handlers' requests waited for the client-side rate limit
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "kubetune_reconciles", "Reconciles by kind, what woke them (change, child, dataset, timer) and outcome "
    "(success, retry, error).", ["kind", "trigger", "result"], registry=REGISTRY,
)
ERRORS = Counter(
    "kubetune_reconcile_errors", "Reconciles that failed, by kind and error (permanent, unexpected).",
    ["kind", "error"], registry=REGISTRY,
)
DURATION = Histogram(
    "kubetune_reconcile_duration_seconds", "Time spent in one reconcile.", ["kind"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS = Gauge(
    "kubetune_finetunejobs", "FineTuneJobs whose condition of this type is True.", ["condition"], registry=REGISTRY,
)
STAGE_DURATION = Histogram(
    "kubetune_stage_duration_seconds", "Wall time of finished stages, from the PyTorchJob's start to completion.",
    ["type", "result"], registry=REGISTRY,
    buckets=(1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200),
)
PYTORCHJOBS_CREATED = Counter(
    "kubetune_pytorchjobs_created", "PyTorchJobs created for stages, by stage type.", ["type"], registry=REGISTRY,
)
VALIDATION_JOBS_CREATED = Counter(
    "kubetune_validation_jobs_created", "PreferenceDataset validation Jobs created.", registry=REGISTRY,
)
INFERENCESERVICES_APPLIED = Counter(
    "kubetune_inferenceservices_applied", "InferenceServices created or updated.", ["action"], registry=REGISTRY,
)
API_REQUESTS = Counter(
    "kubetune_api_requests", "Requests the handlers sent to the API server (kopf's own are not counted).",
    ["method"], registry=REGISTRY,
)
API_THROTTLED = Counter(
    "kubetune_api_throttled_seconds", "Seconds the handlers' requests waited for the client-side rate limit "
    "(--api-qps, --api-burst); growing fast: the limit, not the API server, paces the operator.", registry=REGISTRY,
)

# Job conditions tracked by kubetune_finetunejobs.
TRACKED_CONDITIONS = ("Accepted", "Running", "Suspended", "Succeeded", "Failed", "Ready", "Stalled")
_TRACKED = frozenset(TRACKED_CONDITIONS)
_true_conditions: dict[str, frozenset[str]] = {}
_lock = threading.Lock()
for _c in TRACKED_CONDITIONS:
    JOBS.labels(_c).set(0)


def set_job_conditions(key: str, true_conditions: set[str] | None) -> None:
    """Record which conditions of FineTuneJob `key` are True (None: the job is gone). The gauges
    move by the job's own change only: nothing here grows with the number of jobs."""
    new = frozenset() if true_conditions is None else frozenset(true_conditions) & _TRACKED
    with _lock:
        old = _true_conditions.pop(key, frozenset())
        if true_conditions is not None:
            _true_conditions[key] = new
        for c in old - new:
            JOBS.labels(c).dec()
        for c in new - old:
            JOBS.labels(c).inc()


@contextmanager
def reconciling(kind: str, trigger: str = "change") -> Iterator[None]:
    """Count and time one reconcile of `kind`, woken by `trigger`, classifying how it ended."""
    import kopf

    start = time.monotonic()
    try:
        yield
    except kopf.TemporaryError:
        RECONCILES.labels(kind, trigger, "retry").inc()  # "not yet": waiting is no error
        raise
    except kopf.PermanentError:
        RECONCILES.labels(kind, trigger, "error").inc()
        ERRORS.labels(kind, "permanent").inc()
        raise
    except Exception:
        RECONCILES.labels(kind, trigger, "error").inc()
        ERRORS.labels(kind, "unexpected").inc()
        raise
    else:
        RECONCILES.labels(kind, trigger, "success").inc()
    finally:
        DURATION.labels(kind).observe(time.monotonic() - start)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` in a background thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)
