"""Kueue's side of a queued stage: the Workload Kueue makes for a stage's PyTorchJob, why it waits,
and how a queued stage is suspended.

Kueue owns `runPolicy.suspend` of the PyTorchJobs it manages (those with its queue-name label): it
suspends them until it admits their Workload, and unsuspends a job whose Workload it admitted,
whoever suspended it. So a queued stage is suspended the way Kueue documents, by deactivating its
Workload (`spec.active: false`): Kueue evicts it, suspends the PyTorchJob (the pods stop, the
checkpoints stay), frees its quota, and queues it again once it is active. The operator marks the
Workloads it deactivated, so it reactivates only those.
"""

from __future__ import annotations

from typing import Any

from kubetune.backends.pytorchjob import KUEUE_QUEUE_LABEL

WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # Kueue labels a job's Workload with the job's uid
DEACTIVATED_BY = "kubetune.io/deactivated-by"


def queue_of(pytorchjob: dict[str, Any]) -> str | None:
    """The Kueue LocalQueue a PyTorchJob was submitted to, if any."""
    return ((pytorchjob.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)


def workload_selector(pytorchjob: dict[str, Any]) -> str:
    return f"{JOB_UID_LABEL}={pytorchjob['metadata']['uid']}"


def _condition(workload: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), {})


def why_waiting(workload: dict[str, Any]) -> str:
    """Why Kueue has not admitted (or has evicted) the Workload, in Kueue's words; "" when admitted."""
    if _condition(workload, "Admitted").get("status") == "True":
        return ""
    if not is_active(workload):
        return "its Kueue Workload is deactivated"
    evicted = _condition(workload, "Evicted")
    if evicted.get("status") == "True":
        return f"evicted by Kueue ({evicted.get('reason', '')}): {evicted.get('message', '')}"
    reserved = _condition(workload, "QuotaReserved")
    return str(reserved.get("message") or "") if reserved.get("status") != "True" else ""


def is_active(workload: dict[str, Any]) -> bool:
    return (workload.get("spec") or {}).get("active", True) is not False


def deactivated_by_us(workload: dict[str, Any]) -> bool:
    return DEACTIVATED_BY in ((workload.get("metadata") or {}).get("annotations") or {})


def active_patch(active: bool) -> dict[str, Any]:
    """The merge patch that deactivates a Workload (marking it as ours) or activates it again."""
    return {"metadata": {"annotations": {DEACTIVATED_BY: None if active else "spec.runPolicy.suspend"}},
            "spec": {"active": active}}
