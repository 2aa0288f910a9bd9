"""One FineTuneJob stage as a Kubeflow training-operator v1 PyTorchJob.

    Master (1) + Worker (nodes-1), nprocPerNode = GPUs per node (1 without GPUs),
    container `pytorch`: kubetune-train /etc/kubetune/stagerun.json

The StageRun goes into a ConfigMap of the same name, mounted at /etc/kubetune. The
training-operator injects PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE, PET_MASTER_ADDR/PORT
(and MASTER_ADDR/PORT, WORLD_SIZE, and RANK = the node rank); `kubetune-train` is the torchrun
agent itself (it reads the same PET_* variables and starts one worker per GPU), which keeps the
failing worker's exit code: 1-127 permanent, 128-255 retryable, as the `ExitCode` restart
policy expects (plain torchrun exits 1 whatever happened).
"""

from __future__ import annotations

from typing import Any

from kubetune.api.finetunejob import FineTuneJob, Stage
from kubetune.api.stagerun import StageRun
from kubetune.backends import (
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_STAGE,
    LABEL_STAGE_INDEX,
    MANAGED_BY,
    PVC_ROOT,
    BackendSettings,
    child_name,
    label_value,
    pod_annotations,
    pvc_claim,
    pvc_volumes,
    scratch_space,
    security_contexts,
)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER = "pytorch"  # the training-operator finds the master port on the container of this name
MASTER_PORT = 23456
STAGERUN_DIR = "/etc/kubetune"
STAGERUN_FILE = "stagerun.json"
# Pods are named <job>-worker-<i> and get a Service of that name (a DNS-1035 label, <= 63).
MAX_NAME = 63 - len("-worker-511")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"
# Set on a PyTorchJob the operator suspended because of spec.runPolicy.suspend, so it only
# resumes what it suspended itself (Kueue suspends jobs too, until it admits them).
SUSPENDED_BY = "kubetune.io/suspended-by"


def job_name(job: str, stage: str) -> str:
    """`<job>-<stage>`, shortened with a hash when it would make too long pod or Service names."""
    return child_name(job, stage, max_length=MAX_NAME)


def labels(job: FineTuneJob, stage: Stage, index: int) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: label_value(job.metadata.name),
        LABEL_STAGE: stage.name,
        LABEL_STAGE_INDEX: str(index),
    }


def stagerun_configmap(job: FineTuneJob, index: int, run: StageRun) -> dict[str, Any]:
    stage = job.spec.stages[index]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": job_name(job.metadata.name, stage.name), "labels": labels(job, stage, index)},
        "data": {STAGERUN_FILE: run.model_dump_json(by_alias=True, exclude_none=True, indent=2)},
    }


def _claims(run: StageRun) -> dict[str, bool]:
    """Claims the stage reads (read-only) or writes, by name."""
    claims: dict[str, bool] = {}
    for uri in (run.model_uri, run.reference_model_uri, run.dataset.uri, run.dataset.validation_uri):
        claim = pvc_claim(uri)
        if claim:
            claims.setdefault(claim, True)
    out = pvc_claim(run.output_uri)
    if out:
        claims[out] = False
    return claims


def _uses_s3(run: StageRun) -> bool:
    uris = (run.model_uri, run.reference_model_uri, run.dataset.uri, run.dataset.validation_uri, run.output_uri)
    return any(u and u.startswith("s3://") for u in uris)


def _resources(stage: Stage) -> dict[str, Any]:
    r = stage.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if r.gpus_per_node:
        limits["nvidia.com/gpu"] = r.gpus_per_node
    for key, value in (("cpu", r.cpu), ("memory", r.memory)):
        if value:
            limits[key] = requests[key] = value
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _pod_template(
    job: FineTuneJob, index: int, run: StageRun, settings: BackendSettings, name: str
) -> dict[str, Any]:
    stage = job.spec.stages[index]
    pod_sc, container_sc = security_contexts(settings)
    volumes, mounts = pvc_volumes(_claims(run))
    scratch_volumes, scratch_mounts, scratch_env = scratch_space()
    volumes = [
        {"name": "stagerun", "configMap": {"name": name}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": stage.resources.shm_size}},
        *scratch_volumes,
        *volumes,
    ]
    mounts = [
        {"name": "stagerun", "mountPath": STAGERUN_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *scratch_mounts,
        *mounts,
    ]
    env = [
        {"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        *scratch_env,
    ]
    ports = [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}]
    if run.metrics_port:
        ports.append({"name": "metrics", "containerPort": run.metrics_port, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune-train", f"{STAGERUN_DIR}/{STAGERUN_FILE}"],
        # a failed pod's status carries the trainer's last log lines ("Failed stage exitCode=1 ...")
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": env,
        "ports": ports,
        "resources": _resources(stage),
        "volumeMounts": mounts,
    }
    if _uses_s3(run):
        container["envFrom"] = [{"secretRef": {"name": settings.storage_secret, "optional": True}}]
    if container_sc:
        container["securityContext"] = container_sc
    annotations = pod_annotations(job.metadata.annotations, stage.name)
    # The trainer never calls the API server (and may run a model's own code with trustRemoteCode):
    # no ServiceAccount token in its pods.
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes, "automountServiceAccountToken": False}
    queue = job.spec.run_policy.queue
    if queue and queue.provider == "volcano":
        spec["schedulerName"] = "volcano"
        annotations[VOLCANO_QUEUE_ANNOTATION] = queue.name
    if stage.resources.node_selector:
        spec["nodeSelector"] = dict(stage.resources.node_selector)
    if stage.resources.tolerations:
        spec["tolerations"] = [t.to_wire() for t in stage.resources.tolerations]
    if pod_sc:
        spec["securityContext"] = pod_sc
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    metadata: dict[str, Any] = {"labels": labels(job, stage, index)}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


def render(job: FineTuneJob, index: int, run: StageRun, settings: BackendSettings) -> dict[str, Any]:
    """The PyTorchJob of stage `index` (its StageRun already rendered); owner references are the caller's."""
    stage = job.spec.stages[index]
    name = job_name(job.metadata.name, stage.name)
    template = _pod_template(job, index, run, settings, name)
    nodes = stage.resources.nodes
    replica = {"restartPolicy": "ExitCode", "template": template}
    replicas: dict[str, Any] = {"Master": {"replicas": 1, **replica}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, **replica}
    policy = job.spec.run_policy
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "suspend": policy.suspend, "backoffLimit": policy.backoff_limit}
    if policy.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = policy.active_deadline_seconds
    meta_labels = labels(job, stage, index)
    annotations: dict[str, str] = {}
    if policy.suspend:
        annotations[SUSPENDED_BY] = "spec.runPolicy.suspend"
    if policy.queue and policy.queue.provider == "kueue":
        meta_labels[KUEUE_QUEUE_LABEL] = policy.queue.name
    if policy.queue and policy.queue.provider == "volcano":
        run_policy["schedulingPolicy"] = {"queue": policy.queue.name, "minAvailable": nodes}
    metadata: dict[str, Any] = {"name": name, "labels": meta_labels}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(max(stage.resources.gpus_per_node, 1)),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


# --- reading a PyTorchJob back ------------------------------------------------------------

# Stage states, from the PyTorchJob's conditions (JobConditionType in kubeflow.org/v1).
_ORDER = (("Succeeded", "Succeeded"), ("Failed", "Failed"), ("Suspended", "Suspended"),
          ("Restarting", "Restarting"), ("Running", "Running"), ("Created", "Pending"))


def observe(pytorchjob: dict[str, Any]) -> tuple[str, str, str]:
    """(stage state, reason, message) of a PyTorchJob from its conditions."""
    conditions = (pytorchjob.get("status") or {}).get("conditions") or []
    true = {c.get("type"): c for c in conditions if c.get("status") == "True"}
    for ctype, state in _ORDER:
        if ctype in true:
            c = true[ctype]
            return state, str(c.get("reason") or ctype), str(c.get("message") or "")
    return "Pending", "Pending", "The PyTorchJob has no status yet."


def times(pytorchjob: dict[str, Any]) -> tuple[str | None, str | None]:
    """(startTime, completionTime) of a PyTorchJob."""
    status = pytorchjob.get("status") or {}
    return status.get("startTime"), status.get("completionTime")


def is_suspended(pytorchjob: dict[str, Any]) -> bool:
    return bool(((pytorchjob.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


def suspend_patch(suspend: bool) -> dict[str, Any]:
    """The merge patch that suspends a PyTorchJob (marking it as ours) or resumes it."""
    return {
        "metadata": {"annotations": {SUSPENDED_BY: "spec.runPolicy.suspend" if suspend else None}},
        "spec": {"runPolicy": {"suspend": suspend}},
    }


def suspended_by_us(pytorchjob: dict[str, Any]) -> bool:
    return SUSPENDED_BY in ((pytorchjob.get("metadata") or {}).get("annotations") or {})


def master_pod(name: str) -> str:
    """Name of the master pod the training-operator creates for PyTorchJob `name`."""
    return f"{name}-master-0"
