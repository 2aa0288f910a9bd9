"""A PreferenceDataset's validation Job, and how its report comes back to the operator.

    python -m kubetune.backends.validation --report /dev/termination-log -- \\
        kubetune-train validate --format preference --json pvc://data/pairs.jsonl

The Job runs the trainer image's data validator (`kubetune-train validate ... --json` prints a
JSON report: rows, validRows, checksum, tokenStats, errors [{line, reason}], ...). This module's
`main` wraps it: it passes the validator's output through to the log, keeps the report compact
(at most 4096 bytes: the counts, checksum, token statistics and the first errors) and writes it
to the container's termination message file. The kubelet copies that file into the pod's status
(`containerStatuses[].state.terminated.message`), where the operator reads it: no volume, no
log scraping, no network path from the operator to the pod.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from kubetune.api.formats import held_out_count
from kubetune.api.preferencedataset import FORMAT_BY_SCHEMA, PreferenceDataset
from kubetune.backends import (
    LABEL_DATASET,
    LABEL_MANAGED_BY,
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

CONTAINER = "validate"
TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 4096  # the kubelet keeps at most this much of a termination message
MAX_ERRORS = 20
MAX_REASON = 200
KEYS = ("rows", "validRows", "trainRows", "validationRows", "checksum", "tokenStats")


def job_name(dataset: PreferenceDataset) -> str:
    """One validation Job per generation of the spec: `<dataset>-validate-<generation>`."""
    return child_name(dataset.metadata.name, "validate", str(dataset.metadata.generation or 1))


def command(dataset: PreferenceDataset) -> list[str]:
    spec = dataset.spec
    columns = [f"--columns={k}={v}" for k, v in sorted((spec.columns or {}).items())]
    tokenizer = [f"--tokenizer={spec.tokenizer_uri}"] if spec.tokenizer_uri else []
    return [
        "python", "-m", "kubetune.backends.validation", "--report", TERMINATION_LOG, "--",
        "kubetune-train", "validate", "--format", FORMAT_BY_SCHEMA[spec.schema_], *columns, *tokenizer,
        "--max-errors", str(MAX_ERRORS), "--json", spec.source.uri,
    ]


def render(dataset: PreferenceDataset, settings: BackendSettings) -> dict[str, Any]:
    """The batch/v1 Job that validates `dataset` (owner references are the caller's)."""
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DATASET: label_value(dataset.metadata.name)}
    pod_sc, container_sc = security_contexts(settings)
    uris = [u for u in (dataset.spec.source.uri, dataset.spec.tokenizer_uri) if u]
    volumes, mounts = pvc_volumes({claim: True for u in uris if (claim := pvc_claim(u))})  # read-only
    scratch_volumes, scratch_mounts, scratch_env = scratch_space()
    volumes += scratch_volumes
    mounts += scratch_mounts
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command(dataset),
        "env": [{"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
                *scratch_env],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "volumeMounts": mounts,
    }
    if any(u.startswith("s3://") for u in uris):
        container["envFrom"] = [{"secretRef": {"name": settings.storage_secret, "optional": True}}]
    if container_sc:
        container["securityContext"] = container_sc
    # validation reads data and never calls the API server: no ServiceAccount token in its pod
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], "volumes": volumes,
                           "automountServiceAccountToken": False}
    if pod_sc:
        pod["securityContext"] = pod_sc
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if settings.validation_node_selector:
        pod["nodeSelector"] = dict(settings.validation_node_selector)
    if settings.validation_tolerations:
        pod["tolerations"] = [dict(t) for t in settings.validation_tolerations]
    template_meta: dict[str, Any] = {"labels": dict(labels)}
    annotations = pod_annotations(dataset.metadata.annotations)
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(dataset), "labels": labels},
        "spec": {
            "backoffLimit": 2,
            # Bad data or a bad command line (exit 1 or 2) fails at once; I/O errors are retried.
            "podFailurePolicy": {"rules": [{
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [1, 2]},
            }]},
            "template": {"metadata": template_meta, "spec": pod},
        },
    }


# --- the report ---------------------------------------------------------------------------


def compact(report: dict[str, Any], limit: int = MESSAGE_LIMIT) -> str:
    """The report as JSON of at most `limit` bytes: counts, checksum, token stats, first errors."""
    out: dict[str, Any] = {k: report[k] for k in KEYS if k in report}
    errors = [
        {"line": e.get("line"), "reason": str(e.get("reason", ""))[:MAX_REASON]}
        for e in (report.get("errors") or [])[:MAX_ERRORS]
        if isinstance(e, dict)
    ]
    out["errors"] = errors
    text = json.dumps(out, separators=(",", ":"))
    while len(text.encode()) > limit and out["errors"]:
        out["errors"].pop()
        text = json.dumps(out, separators=(",", ":"))
    if len(text.encode()) > limit:
        out.pop("tokenStats", None)
        text = json.dumps(out, separators=(",", ":"))
    return text


def _last_json(text: str) -> dict[str, Any] | None:
    """The JSON object the validator printed (the whole output, else its last line that parses)."""
    candidates = [text] + text.strip().splitlines()[::-1]
    for c in candidates:
        try:
            value = json.loads(c)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the validator, pass its output through, write the compact report; its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "--report" or args[2] != "--":
        print("usage: python -m kubetune.backends.validation --report FILE -- COMMAND...", file=sys.stderr)
        return 2
    path, cmd = args[1], args[3:]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, 1, "", f"could not start {cmd[0]}: {e}")
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    report = _last_json(proc.stdout)
    if report is not None:
        message = compact(report)
    else:
        tail = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}")[-1000:]
        message = json.dumps({"error": tail}, separators=(",", ":"))
    try:
        with open(path, "w") as f:
            f.write(message)
    except OSError as e:
        print(f"could not write the report to {path}: {e}", file=sys.stderr)
    return proc.returncode


def read_report(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The report in a finished validation pod's termination message, or None."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") != CONTAINER:
            continue
        terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not terminated:
            return None
        message = terminated.get("message") or ""
        try:
            value = json.loads(message)
        except ValueError:
            value = {"error": message.strip() or f"exit code {terminated.get('exitCode')}"}
        if isinstance(value, dict):
            value.setdefault("exitCode", terminated.get("exitCode"))
            return value
    return None


def split_rows(valid_rows: int, fraction: float) -> tuple[int, int]:
    """(train, validation) rows of the held-out split, counted as the trainer splits (`held_out_count`)."""
    held = held_out_count(valid_rows, fraction)
    return valid_rows - held, held


if __name__ == "__main__":
    sys.exit(main())
