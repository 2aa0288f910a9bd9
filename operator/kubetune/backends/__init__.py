"""How kubetune objects become Kubernetes workloads.

`pytorchjob.py` renders a FineTuneJob stage into a Kubeflow training-operator v1 PyTorchJob;
`validation.py` renders a PreferenceDataset into a batch/v1 validation Job. Both are pure
functions of the API objects and the operator's `BackendSettings`, so tests render them
without a cluster.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.meta import GROUP

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"

# Labels on everything the operator creates.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune"
LABEL_JOB = f"{GROUP}/finetunejob"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_STAGE_INDEX = f"{GROUP}/stage-index"
LABEL_DATASET = f"{GROUP}/preferencedataset"
# Pod annotations copied from the owner: `kubetune.io/pod-annotations` (JSON object) on a
# FineTuneJob or PreferenceDataset goes onto every pod template it makes;
# `kubetune.io/pod-annotations.<stage>` onto that stage's pods only.
POD_ANNOTATIONS = f"{GROUP}/pod-annotations"


@dataclass(frozen=True)
class BackendSettings:
    """Operator-wide settings of the workloads it renders (`kubetune operator --help`)."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    # envFrom this Secret (optional: a missing one is fine) when a stage or data set uses s3://:
    # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...
    storage_secret: str = "kubetune-storage"
    # runAsNonRoot, no privilege escalation, drop ALL, seccomp RuntimeDefault (PodSecurity restricted).
    restricted_security_context: bool = True
    run_as_user: int | None = 1000
    trainer_metrics_port: int = 9310
    # Where the validation Job's pods may run (they need no GPU).
    validation_node_selector: dict[str, str] = field(default_factory=dict)
    validation_tolerations: list[dict[str, Any]] = field(default_factory=list)


_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def child_name(*parts: str, max_length: int = 63) -> str:
    """A deterministic DNS-1035 label from `parts` joined by '-'.

    Kept as is when it fits and is valid; otherwise cleaned, cut and suffixed with a hash of
    the original, so the same parts always give the same name and different ones differ.
    """
    base = "-".join(parts)
    if len(base) <= max_length and _DNS1035.match(base):
        return base
    clean = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    if not clean or not clean[0].isalpha():
        clean = "k-" + clean
    suffix = short_hash(base)
    return f"{clean[: max_length - len(suffix) - 1].rstrip('-')}-{suffix}"


_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def label_value(value: str) -> str:
    """A label value (at most 63 characters) that stands for `value`."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    return child_name(value, max_length=63)


def pod_annotations(owner_annotations: dict[str, str] | None, stage: str | None = None) -> dict[str, str]:
    """The annotations an owner asks to have copied onto its pods (see POD_ANNOTATIONS)."""
    import json

    out: dict[str, str] = {}
    keys = [POD_ANNOTATIONS] + ([f"{POD_ANNOTATIONS}.{stage}"] if stage else [])
    for key in keys:
        raw = (owner_annotations or {}).get(key)
        if not raw:
            continue
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"annotation {key} must be a JSON object of strings: {e}") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"annotation {key} must be a JSON object of strings")
        out.update(value)
    return out


def pvc_claim(uri: str | None) -> str | None:
    """The claim of a pvc:// uri, else None."""
    if not uri or not uri.startswith("pvc://"):
        return None
    return uri.removeprefix("pvc://").split("/", 1)[0] or None


PVC_ROOT = "/mnt/pvc"
# The trainer image's writable cache (HF_HOME, KUBETUNE_CACHE, compiled kernels): an emptyDir.
CACHE_DIR = "/cache"


def pvc_volumes(claims: dict[str, bool]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for claims (name -> read-only), mounted at /mnt/pvc/<claim>."""
    volumes, mounts = [], []
    for claim, read_only in sorted(claims.items()):
        vol = child_name("pvc", claim)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only})
    return volumes, mounts


def security_contexts(settings: BackendSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod securityContext, container securityContext) for PodSecurity `restricted`."""
    if not settings.restricted_security_context:
        return {}, {}
    pod: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if settings.run_as_user is not None:
        pod.update(runAsUser=settings.run_as_user, runAsGroup=settings.run_as_user, fsGroup=settings.run_as_user)
    container = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,  # writes go to the emptyDirs of `scratch_space`
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return pod, container


def scratch_space() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    """(volumes, mounts, env) of the only writable places of a trainer pod besides its output:
    /cache (home, model hub cache, compiled kernels) and /tmp, both emptyDirs, so the root
    filesystem can stay read-only."""
    volumes = [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    env = [
        {"name": "HOME", "value": f"{CACHE_DIR}/home"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "KUBETUNE_CACHE", "value": f"{CACHE_DIR}/kubetune"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{CACHE_DIR}/torch_extensions"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
    ]
    return volumes, mounts, env
