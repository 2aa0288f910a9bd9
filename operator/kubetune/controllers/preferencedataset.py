"""PreferenceDataset controller: a validation Job per spec generation, its report in status.

The Job runs `kubetune-train validate --json` in the trainer image (backends/validation.py);
its compact report comes back in the pod's termination message. Valid data: Ready=True with
the counts, checksum and token statistics. Bad rows: Ready=False, reason Invalid, and the
first errors with their line numbers, which is also what a FineTuneJob reading it fails with.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune import metrics
from kubetune.api import reasons as r
from kubetune.api.meta import find_condition, set_condition
from kubetune.api.preferencedataset import PreferenceDataset
from kubetune.api.validation import semantic_problems
from kubetune.backends import LABEL_DATASET, LABEL_MANAGED_BY, MANAGED_BY
from kubetune.backends import validation as backend
from kubetune.controllers import common
from kubetune.controllers.common import PREFERENCEDATASETS, RUNTIME

log = logging.getLogger("kubetune.operator")
SHOWN_ERRORS = 10  # errors kept in status (the report may hold more)


@kopf.on.resume(*PREFERENCEDATASETS)
@kopf.on.create(*PREFERENCEDATASETS)
@kopf.on.update(*PREFERENCEDATASETS)
def on_preferencedataset(name: str, namespace: str | None, **_: Any) -> None:
    reconcile(namespace or "", name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_DATASET: kopf.PRESENT})
def on_validation_job(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    owner = common.owner_name(dict(body), "PreferenceDataset")
    if owner and namespace:
        common.quietly(lambda: reconcile(namespace, owner, trigger="child"))


def reconcile(namespace: str, name: str, trigger: str = "change") -> None:
    with common.locked("PreferenceDataset", namespace, name), metrics.reconciling("PreferenceDataset", trigger):
        body = common.get_custom(PREFERENCEDATASETS, namespace, name)
        if body is not None and not body["metadata"].get("deletionTimestamp"):
            _reconcile(body)


def _reconcile(body: dict[str, Any]) -> None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    namespace, generation = meta["namespace"], meta.get("generation")
    conditions = list(status.get("conditions") or [])
    ready = find_condition(conditions, r.READY)
    if ready and ready.get("observedGeneration") == generation and ready.get("reason") != r.VALIDATING:
        return  # this generation is judged
    dataset = PreferenceDataset.model_validate({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    problems = [f"{p.path}: {p.message}" for p in semantic_problems(dataset) if p.severity == "error"]
    if problems:
        message = "Fix the spec: " + "; ".join(problems) + "."
        _write(body, status, {"conditions": set_condition(conditions, r.READY, "False", r.INVALID_SPEC, message, generation)})
        raise kopf.PermanentError(message)

    job = backend.render(dataset, RUNTIME.settings)
    kopf.adopt(job, owner=common.kopf_body(body))
    job, created = common.create_core("Job", namespace, job)
    job_name = job["metadata"]["name"]
    if created:
        metrics.VALIDATION_JOBS_CREATED.inc()
        log.info("Created Job name=%s namespace=%s preferencedataset=%s", job_name, namespace, meta["name"])
        common.event(body, r.EVENT_CREATED, f"Created Job {job_name} to validate {dataset.spec.source.uri}.")
    finished = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []
                if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"}
    if not finished:
        message = f"Validating the rows of {dataset.spec.source.uri} (Job {job_name})."
        _write(body, status, {"observedGeneration": generation,
                              "conditions": set_condition(conditions, r.READY, "False", r.VALIDATING, message, generation)})
        return

    report = _report(namespace, job_name)
    new = summary(report, dataset.spec.split.validation_fraction)
    if "Complete" in finished and report and not report.get("errors") and "error" not in report:
        reason, message = r.DATA_VALID, f"{new.get('validRows', 0)} valid rows, checksum {new.get('checksum', 'unknown')}."
        common.event(body, r.EVENT_VALIDATED, message)
    elif report and report.get("errors"):
        reason, message = r.DATA_INVALID, invalid_message(report)
        common.event(body, r.DATA_INVALID, message, warning=True)
    else:
        job_failed = finished.get("Failed") or {}
        why = (report or {}).get("error") or job_failed.get("message") or "the validation Job failed without a report"
        reason, message = r.VALIDATION_FAILED, f"Could not validate {dataset.spec.source.uri}: {why}"
        common.event(body, r.VALIDATION_FAILED, message, warning=True)
    status_value = "True" if reason == r.DATA_VALID else "False"
    new.update(observedGeneration=generation,
               conditions=set_condition(conditions, r.READY, status_value, reason, message, generation))  # type: ignore[arg-type]
    _write(body, status, new)


def _report(namespace: str, job_name: str) -> dict[str, Any] | None:
    """The report of the Job's newest finished pod (a succeeded one first)."""
    pods = common.core().list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
    pods.sort(key=lambda p: ((p.get("status") or {}).get("phase") == "Succeeded", p["metadata"].get("creationTimestamp") or ""))
    for pod in reversed(pods):
        report = backend.read_report(pod)
        if report is not None:
            return report
    return None


def summary(report: dict[str, Any] | None, validation_fraction: float) -> dict[str, Any]:
    """The status fields a report fills: counts, checksum, token statistics, first errors."""
    if not report:
        return {}
    out: dict[str, Any] = {k: report[k] for k in ("rows", "validRows", "checksum") if report.get(k) is not None}
    if "validRows" in out:
        train, held = backend.split_rows(int(out["validRows"]), validation_fraction)
        out["trainRows"] = int(report.get("trainRows", train))
        out["validationRows"] = int(report.get("validationRows", held))
    stats = _flatten(report.get("tokenStats") or {})
    if stats:
        out["tokenStats"] = stats
    out["errors"] = [{"line": int(e.get("line") or 0), "reason": str(e.get("reason", ""))}
                     for e in (report.get("errors") or [])[:SHOWN_ERRORS]]
    return out


def invalid_message(report: dict[str, Any]) -> str:
    """'2 of 40 rows are invalid: line 3: ...; line 9: ...' (the first three errors)."""
    errors = report.get("errors") or []
    rows, valid = report.get("rows"), report.get("validRows")
    if rows is not None and valid is not None:
        head = f"{rows - valid} of {rows} rows are invalid"
    else:
        head = f"{len(errors)} rows are invalid"
    shown = "; ".join(f"line {e.get('line')}: {e.get('reason')}" for e in errors[:3])
    return f"{head}: {shown}" + ("; ..." if len(errors) > 3 else "") + ". Fix the data and create a new PreferenceDataset."


def _flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"prompt": {"mean": 12}} -> {"promptMean": 12.0}; numbers only."""
    out: dict[str, float] = {}
    for k, v in stats.items():
        key = f"{prefix}{k[:1].upper()}{k[1:]}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _write(body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
    if common.changed(old, new):
        common.patch_status(PREFERENCEDATASETS, body, new)
