"""The FineTuneJob state machine as pure functions: spec checks, observed world in, status out.

`controllers/finetunejob.py` reads the cluster (the job, its PyTorchJobs, its
PreferenceDatasets), calls `observe_stages` and `job_conditions`, acts (creates the next
stage, suspends, publishes) and writes what these return. Nothing here talks to the API
server, so every transition is unit-tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from kubetune.api import reasons as r
from kubetune.api import registry
from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.meta import set_condition
from kubetune.api.stagerun import stage_model_uri, stage_output_uri, start_of
from kubetune.api.validation import semantic_problems
from kubetune.backends import kueue, pod_annotations, pytorchjob

TERMINAL = ("Succeeded", "Failed")
ACTIVE = ("Pending", "Running", "Restarting", "Suspended")

# What the trainer's exit codes mean (kubetune_trainer/launch.py), for failure messages.
EXIT_CODES = {
    1: "a permanent error: invalid StageRun, bad data, an unsupported combination or a missing input",
    2: "a bad command line",
    137: "killed (SIGKILL): out of memory or evicted",
    143: "terminated (SIGTERM): preempted or evicted",
    201: "out of memory",
    202: "distributed communication failed",
    203: "an I/O error reading or writing storage",
    204: "the accelerator failed",
}


class Phase(StrEnum):
    """Where a pipeline stands, as the controller acts on it (not written to status: conditions are)."""

    SUCCEEDED = "Succeeded"  # every stage succeeded
    FAILED = "Failed"  # a stage failed, or its data set is invalid
    INVALID = "Invalid"  # the spec failed a check; nothing was created
    RUNNING = "Running"  # the current stage's pods run
    RESTARTING = "Restarting"  # the current stage restarts after a retryable failure
    PENDING = "Pending"  # the current stage's PyTorchJob waits for its pods
    START = "Start"  # the next stage is to be created
    WAITING = "Waiting"  # the next stage waits for its PreferenceDataset
    SUSPENDED = "Suspended"  # spec.runPolicy.suspend holds the pipeline


@dataclass
class Plan:
    """Where the pipeline stands after observing it."""

    stages: list[dict[str, Any]]
    phase: Phase
    index: int  # the stage that phase is about (the next to start for Start)
    reason: str = ""
    message: str = ""


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    def parse(t: str) -> datetime:
        return datetime.fromisoformat(t.replace("Z", "+00:00"))

    return max(0.0, (parse(end) - parse(start)).total_seconds())


def check(body: dict[str, Any]) -> tuple[FineTuneJob | None, list[str]]:
    """The job's model and what keeps it from running on a cluster, each problem with its fix."""
    try:
        job = FineTuneJob.model_validate({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    except ValidationError as e:
        return None, [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    problems = [f"{p.path}: {p.message}" for p in semantic_problems(job) if p.severity == "error"]
    spec = job.spec
    out = spec.output.uri
    if not out or not out.startswith(("pvc://", "s3://")):
        problems.append(
            f"spec.output.uri: {'is not set' if not out else out + ' is not shared storage'}; the stages' pods write "
            "there and the next stage reads from there, so set it to pvc://<claim>/<path> or s3://<bucket>/<path>")
    uris = [("spec.model.uri", spec.model.uri)]
    if spec.model.init is not None and spec.model.init.tokenizer is not None:
        uris.append(("spec.model.init.tokenizer.uri", spec.model.init.tokenizer.uri))
    for i, stage in enumerate(spec.stages):
        uris += [(f"spec.stages[{i}].dataset.uri", stage.dataset.uri),
                 (f"spec.stages[{i}].dataset.validationUri", stage.dataset.validation_uri)]
        if stage.tuning.method == "qlora" and stage.resources.gpus_per_node == 0:
            problems.append(f"spec.stages[{i}].resources.gpusPerNode: QLoRA quantizes the base model with "
                            "bitsandbytes on GPUs; set gpusPerNode to 1 or more, or use tuning.method lora")
        try:
            pod_annotations(job.metadata.annotations, stage.name)
        except ValueError as e:
            problems.append(f"metadata.annotations: {e}")
    for path, uri in uris:
        if uri and uri.startswith("file://"):
            problems.append(f"{path}: {uri} is a path on one machine (for `kubetune run`); on a cluster use "
                            "pvc://, s3:// or hf://")
    return job, sorted(set(problems), key=problems.index)


def restarted_at(pytorchjob: dict[str, Any]) -> str | None:
    """When the training-operator last restarted the PyTorchJob's pods, while it restarts them: the
    lastTransitionTime of its Restarting condition. (Training-operator v1 keeps no restart count, and
    drops the condition once the pods run again, so restarts are counted as they are seen.)"""
    for c in (pytorchjob.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Restarting" and c.get("status") == "True":
            return str(c.get("lastTransitionTime") or "") or None
    return None


def count_restart(entry: dict[str, Any], at: str | None) -> None:
    """Count a restart seen at `at` in the stage's status entry, once (lastRestartTime). The next
    master pod is its replacement: it is recorded when seen (note_master_pod), not counted again."""
    if at and (entry.get("lastRestartTime") or "") < at:
        entry["restarts"] = int(entry.get("restarts") or 0) + 1
        entry["lastRestartTime"] = at
        entry.pop("masterPodUID", None)


def note_master_pod(entry: dict[str, Any], pod: dict[str, Any]) -> None:
    """Record the running stage's master pod. One of another uid than the one recorded replaced it
    without a Restarting condition (the training-operator shows none when a pod was deleted, or
    removed with its lost node): that is a restart, at the new pod's creation."""
    uid = pod["metadata"]["uid"]
    if entry.get("masterPodUID") not in (None, uid):
        count_restart(entry, pod["metadata"].get("creationTimestamp"))
    entry["masterPodUID"] = uid


def observe_stages(
    job: FineTuneJob, children: dict[str, dict[str, Any]], previous: list[dict[str, Any]], output_base: str,
    restarts: dict[str, str] | None = None,
) -> Plan:
    """Stage statuses from the PyTorchJobs (by name) and the previous status, and the next step.
    `restarts`: restarts seen in watch events (PyTorchJob name -> time) that `children` may no longer show.

    A stage whose PyTorchJob is gone keeps the state the status recorded when it was final,
    so a deleted child never makes a finished stage run again. A stage whose PyTorchJob was
    created (the status names it) and is gone before the stage was recorded final was deleted
    under it: by a user stopping it, or while the operator was down, when it may have finished
    unseen. That stage fails (StageDeleted) rather than run again unasked.
    """
    prev = {s.get("name"): s for s in previous}
    stages: list[dict[str, Any]] = []
    plan: Plan | None = None
    n = len(job.spec.stages)
    for i, stage in enumerate(job.spec.stages):
        name = pytorchjob.job_name(job.metadata.name, stage.name)
        entry: dict[str, Any] = {"name": stage.name, "type": stage.type, "state": "Pending"}
        old = prev.get(stage.name) or {}
        for k in ("jobName", "startTime", "completionTime", "outputUri", "lastCheckpoint", "step", "totalSteps",
                  "etaSeconds", "metrics", "message", "tokensTrained", "samplesTrained", "restarts", "lastRestartTime",
                  "masterPodUID"):
            if old.get(k) is not None:
                entry[k] = old[k]
        child, deleted = children.get(name), False
        if child is not None:
            state, reason, message = pytorchjob.observe(child)
            start, end = pytorchjob.times(child)
            if state == "Suspended" and kueue.queue_of(child) and not job.spec.run_policy.suspend:
                state = "Pending"  # Kueue holds it until it admits it (or evicted it): it waits in the queue
            entry.update(state=state, jobName=name, message=f"{reason}: {message}" if message else reason)
            if pytorchjob.is_suspended(child):
                entry.pop("masterPodUID", None)  # the pods a resumption brings are not restarts
            for at in sorted(t for t in {(restarts or {}).get(name), restarted_at(child)} if t):
                count_restart(entry, at)
            entry.setdefault("restarts", 0)
            if start:
                entry["startTime"] = start
            if end and state in TERMINAL:
                entry["completionTime"] = end
        elif old.get("state") in TERMINAL:
            entry["state"] = old["state"]
        elif old.get("jobName") == name:
            entry.update(state="Failed", message=f"PyTorchJob {name} was deleted before the stage's result was "
                         "recorded; to run it again, delete and recreate the FineTuneJob (to pause a stage, set "
                         "spec.runPolicy.suspend instead)")
            deleted = True
        if entry["state"] == "Succeeded":
            entry["outputUri"] = stage_output_uri(output_base, stage)
            entry.pop("etaSeconds", None)
            if entry.get("totalSteps"):
                entry["step"] = entry["totalSteps"]
        stages.append(entry)
        if plan is not None or entry["state"] == "Succeeded":
            continue
        label = f"Stage {i + 1}/{n} {stage.name}"
        if entry["state"] == "Failed":
            plan = Plan(stages, Phase.FAILED, i, r.STAGE_DELETED if deleted else r.STAGE_FAILED,
                        f"{label} failed: {entry.get('message', '')}".rstrip(": "))
        elif child is None:
            plan = Plan(stages, Phase.START, i, r.PENDING, f"{label} is next.")
        elif entry["state"] == "Running":
            plan = Plan(stages, Phase.RUNNING, i, r.STAGE_RUNNING, f"{label} is running (PyTorchJob {name}).")
        elif entry["state"] == "Restarting":
            plan = Plan(stages, Phase.RESTARTING, i, r.STAGE_RESTARTING,
                        f"{label} is restarting after a retryable failure: {entry.get('message', '')}.")
        elif entry["state"] == "Suspended":
            plan = Plan(stages, Phase.SUSPENDED, i, r.STAGE_SUSPENDED, f"{label} is suspended (PyTorchJob {name}).")
        elif child is not None and (queue := kueue.queue_of(child)) and pytorchjob.is_suspended(child):
            plan = Plan(stages, Phase.PENDING, i, r.STAGE_QUEUED,
                        f"{label} waits in Kueue LocalQueue {queue} (PyTorchJob {name}).")
        else:
            plan = Plan(stages, Phase.PENDING, i, r.STAGE_CREATED, f"{label} waits for its pods (PyTorchJob {name}).")
    if plan is None:
        done = f"All {n} stages succeeded." if n > 1 else "The stage succeeded."
        return Plan(stages, Phase.SUCCEEDED, n - 1, r.ALL_STAGES_SUCCEEDED, done)
    plan.stages = stages
    return plan


def progress(plan: Plan, total: int) -> tuple[str, str]:
    """(currentStage, progress) for the printer columns, e.g. ("sft", "1/3 sft 42%")."""
    done = sum(1 for s in plan.stages if s.get("state") == "Succeeded")
    current = plan.stages[plan.index]
    if plan.phase == Phase.SUCCEEDED:
        return current["name"], f"{total}/{total}"
    text = f"{done}/{total} {current['name']}"
    step, steps = current.get("step"), current.get("totalSteps")
    if plan.phase in (Phase.RUNNING, Phase.RESTARTING, Phase.SUSPENDED) and step is not None and steps:
        text += f" {min(100, int(100 * step / steps))}%"
    if plan.phase == Phase.FAILED:
        text += " failed"
    return current["name"], text


def job_conditions(
    conditions: list[dict[str, Any]],
    generation: int | None,
    *,
    phase: Phase,
    reason: str,
    message: str,
    accepted: tuple[bool, str, str] = (True, r.VALID, "The spec passed every check."),
    suspended: bool = False,
) -> list[dict[str, Any]]:
    """Every condition of a FineTuneJob for one phase (Succeeded, Failed, Invalid, Running,
    Restarting, Pending, Start, Waiting, Suspended); the whole list, apimachinery-style."""
    def put(ctype: str, status: str, why: str, text: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, ctype, status, why, text, generation)  # type: ignore[arg-type]

    ok, accepted_reason, accepted_message = accepted
    put(r.ACCEPTED, "True" if ok else "False", accepted_reason, accepted_message)
    if suspended:
        put(r.SUSPENDED, "True", r.SUSPENDED_BY_USER, "spec.runPolicy.suspend is true: no new stage starts.")
    else:
        put(r.SUSPENDED, "False", r.NOT_SUSPENDED, "The job is not suspended.")
    if phase == Phase.SUCCEEDED:
        put(r.RUNNING, "False", r.ALL_STAGES_SUCCEEDED, message)
        put(r.SUCCEEDED, "True", reason, message)
        put(r.FAILED, "False", reason, message)
        put(r.READY, "True", reason, message)
        put(r.RECONCILING, "False", r.DONE, "Nothing more to do.")
        put(r.STALLED, "False", r.NOT_STALLED, "Nothing more to do.")
    elif phase in (Phase.FAILED, Phase.INVALID):
        put(r.RUNNING, "False", reason, message)
        put(r.SUCCEEDED, "False", reason, message)
        put(r.FAILED, "True", reason, message)
        put(r.READY, "False", reason, message)
        put(r.RECONCILING, "False", reason, "The job stopped; see the Failed condition.")
        put(r.STALLED, "True", reason, message)
    else:
        running = phase in (Phase.RUNNING, Phase.RESTARTING)
        put(r.RUNNING, "True" if running else "False", reason, message)
        put(r.SUCCEEDED, "Unknown", reason, message)
        put(r.FAILED, "False", reason, message)
        put(r.READY, "False", reason if suspended else r.IN_PROGRESS, message)
        if suspended and not running:
            put(r.RECONCILING, "False", r.SUSPENDED_BY_USER, message)
        else:
            put(r.RECONCILING, "True", r.IN_PROGRESS, message)
        put(r.STALLED, "False", r.NOT_STALLED, "The job is on its way." if ok else accepted_message)
    return conditions


_LOG_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d[ T]|[EWI]\d{4} )")
# What looks like a credential in a log line: `key=value` / `key: value` for secret-sounding keys,
# bearer tokens, user:password@ in URLs, AWS access key ids and Hugging Face tokens.
_CREDENTIALS = [
    (re.compile(r"(?i)\b([\w.-]*(?:secret|password|passwd|token|api[_-]?key|access[_-]?key|credentials?)[\"']?\s*[:=]\s*)"
                r"[\"']?[^\s\"',;}]+[\"']?"), r"\1<redacted>"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 <redacted>"),
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1<redacted>@"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "<redacted>"),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), "<redacted>"),
]


def redact(text: str) -> str:
    """`text` with anything that looks like a credential replaced by <redacted>: pod logs copied
    into status and Events are readable by whoever may read the FineTuneJob."""
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text


def last_words(message: str, limit: int = 600) -> str:
    """The part of a container's termination message that says why it failed.

    With FallbackToLogsOnError that is the log's tail: the trainer's "Failed stage ..." record
    (with the lines it continues on: bad rows and their line numbers), else the last lines.
    """
    lines = [line for line in message.splitlines() if line.strip()]
    start = max((i for i, line in enumerate(lines) if "Failed stage" in line), default=None)
    if start is None:
        picked = lines[-3:]
    else:
        picked = [lines[start]]
        for line in lines[start + 1:]:
            if _LOG_PREFIX.match(line):
                break
            picked.append(line)
    text = redact(" ".join(" ".join(picked).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_detail(pods: list[dict[str, Any]]) -> str:
    """What the failed pods of a stage say: exit code, its meaning, the container's last words."""
    parts = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Failed":
            continue
        name, namespace = pod["metadata"]["name"], pod["metadata"].get("namespace", "")
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if not term or not term.get("exitCode"):
                continue
            code = int(term["exitCode"])
            meaning = EXIT_CODES.get(code, "retryable" if code >= 128 else "a permanent error")
            last = last_words(str(term.get("message") or ""))
            parts.append(f"pod {name} exited with code {code} ({meaning})" + (f": {last}" if last else "")
                         + f"; see kubectl logs -n {namespace} {name}")
    return "; ".join(parts[:2])


def publish_runtime(job: FineTuneJob) -> tuple[str, str]:
    """(serving runtime, why kubetune was picked) for the job's result: spec.publish.runtime when
    set; otherwise vllm where vLLM can serve it, and kubetune (with the reason, a sentence) where not."""
    publish, last = job.spec.publish, job.spec.stages[-1]
    if publish is None or publish.runtime is not None:
        return (publish.runtime if publish is not None and publish.runtime else "vllm"), ""
    info, method = registry.get(last.type), registry.tuning_method(last.tuning.method)
    if info.serving != "vllm":
        return "kubetune", f"vLLM serves causal LMs only, and stage {last.name} trains a {info.head} model"
    if method.kept_apart:
        return "kubetune", f"vLLM cannot load the {method.name} adapter of stage {last.name}, which is not merged"
    if publish.gpus == 0:
        return "kubetune", "spec.publish.gpus is 0 and vLLM's runtime needs a GPU"
    return "vllm", ""


def adapter_spec(job: FineTuneJob, output_base: str) -> dict[str, Any]:
    """The ModelAdapter spec that serves a succeeded job: the last stage's adapter on the model
    that stage started from (LoRA, or one that cannot be merged), or the whole (merged) model."""
    stages = job.spec.stages
    last = stages[-1]
    base, _ = start_of(job, len(stages) - 1, output_base)
    publish = job.spec.publish
    serving: dict[str, Any] = {}
    if publish is not None:
        serving = {"runtime": publish_runtime(job)[0], "gpus": publish.gpus, "shareServer": publish.share_server}
    method = registry.tuning_method(last.tuning.method)
    # LoRA on a model vLLM serves stays an adapter (vLLM and kubetune-serve load it); other models are merged
    vllm_lora = method.vllm_adapter and registry.get(last.type).serving == "vllm" and not job.spec.output.merge
    if base and (method.kept_apart or vllm_lora):
        return {"baseModelUri": base, "adapterUri": stage_output_uri(output_base, last), "serving": serving}
    return {"mergedUri": stage_model_uri(output_base, last), "serving": serving}
