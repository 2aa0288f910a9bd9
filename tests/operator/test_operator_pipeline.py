"""The FineTuneJob state machine: which stage runs next, conditions, progress, checks, publishing."""

from __future__ import annotations

import time
from typing import Any

import pytest

from kubetune import metrics
from kubetune.api import FineTuneJob, find_condition
from kubetune.api import reasons as r
from kubetune.api.stagerun import render_stage_run
from kubetune.controllers.finetunejob import start_stage
from kubetune.controllers.pipeline import (
    Phase,
    Plan,
    adapter_spec,
    check,
    failure_detail,
    job_conditions,
    last_words,
    observe_stages,
    progress,
)

OUT = "pvc://models/pipe"


def pipeline(**spec: Any) -> dict[str, Any]:
    def stage(name: str, type_: str, fmt: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": type_, "dataset": {"uri": f"pvc://data/{name}.jsonl", "format": fmt},
                "resources": {"gpusPerNode": 0}, **extra}

    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "pipe", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "stages": [stage("pretrain", "pretrain", "text"), stage("sft", "sft", "messages", tuning={"method": "lora"}),
                       stage("dpo", "dpo", "preference", tuning={"method": "lora"})],
            "output": {"uri": OUT},
            **spec,
        },
    }


JOB = FineTuneJob.model_validate(pipeline())


def child(*conditions: str, start: str = "2025-01-01T00:00:00Z", end: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": c, "status": "True", "reason": f"PyTorchJob{c}",
                                              "message": f"it is {c.lower()}"} for c in conditions],
                              "startTime": start}
    if end:
        status["completionTime"] = end
    return {"status": status}


def test_a_new_job_starts_its_first_stage() -> None:
    plan = observe_stages(JOB, {}, [], OUT)

    assert (plan.phase, plan.index) == ("Start", 0)
    assert [s["state"] for s in plan.stages] == ["Pending", "Pending", "Pending"]


def test_when_a_stage_succeeds_the_next_one_starts_from_its_output() -> None:
    children = {"pipe-pretrain": child("Created", "Succeeded", end="2025-01-01T00:01:40Z")}

    plan = observe_stages(JOB, children, [], OUT)

    assert (plan.phase, plan.index) == ("Start", 1)
    first = plan.stages[0]
    assert first["state"] == "Succeeded"
    assert first["outputUri"] == f"{OUT}/pretrain"
    assert first["completionTime"] == "2025-01-01T00:01:40Z"


def test_a_running_stage_holds_the_pipeline_and_a_failed_one_stops_it() -> None:
    running = observe_stages(JOB, {"pipe-pretrain": child("Created", "Running")}, [], OUT)
    failed = observe_stages(JOB, {"pipe-pretrain": child("Created", "Succeeded"), "pipe-sft": child("Created", "Failed")},
                            [], OUT)

    assert (running.phase, running.index, running.reason) == ("Running", 0, r.STAGE_RUNNING)
    assert (failed.phase, failed.index, failed.reason) == ("Failed", 1, r.STAGE_FAILED)
    assert "Stage 2/3 sft failed: PyTorchJobFailed: it is failed" == failed.message
    assert failed.stages[2]["state"] == "Pending"


def test_a_finished_stage_whose_pytorchjob_is_gone_is_not_run_again() -> None:
    previous = [{"name": "pretrain", "type": "pretrain", "state": "Succeeded", "jobName": "pipe-pretrain"},
                {"name": "sft", "type": "sft", "state": "Running", "step": 5, "totalSteps": 10}]

    plan = observe_stages(JOB, {"pipe-sft": child("Created", "Running")}, previous, OUT)

    assert plan.stages[0]["state"] == "Succeeded"
    assert (plan.phase, plan.index) == ("Running", 1)
    assert plan.stages[1]["step"] == 5, "progress read from the trainer survives a reconcile"


def test_all_stages_succeeded_is_success_and_progress_is_complete() -> None:
    children = {f"pipe-{s}": child("Succeeded") for s in ("pretrain", "sft", "dpo")}

    plan = observe_stages(JOB, children, [], OUT)

    assert (plan.phase, plan.reason) == ("Succeeded", r.ALL_STAGES_SUCCEEDED)
    assert progress(plan, 3) == ("dpo", "3/3")


def test_progress_names_the_stage_and_its_percentage() -> None:
    previous = [{"name": "pretrain", "state": "Succeeded"}, {"name": "sft", "step": 42, "totalSteps": 100}]

    plan = observe_stages(JOB, {"pipe-pretrain": child("Succeeded"), "pipe-sft": child("Running")}, previous, OUT)

    assert progress(plan, 3) == ("sft", "1/3 sft 42%")


def conditions_of(phase: str, conditions: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, dict[str, Any]]:
    out = job_conditions(conditions or [], 3, phase=phase, reason=kw.pop("reason", "R"), message="m", **kw)
    return {c["type"]: c for c in out}


def test_conditions_of_a_running_job() -> None:
    c = conditions_of("Running", reason=r.STAGE_RUNNING)

    assert {t: v["status"] for t, v in c.items()} == {
        "Accepted": "True", "Suspended": "False", "Running": "True", "Succeeded": "Unknown", "Failed": "False",
        "Ready": "False", "Reconciling": "True", "Stalled": "False",
    }
    assert all(v["observedGeneration"] == 3 for v in c.values())


def test_conditions_of_a_succeeded_and_of_a_failed_job() -> None:
    ok = conditions_of("Succeeded", reason=r.ALL_STAGES_SUCCEEDED)
    bad = conditions_of("Failed", reason=r.STAGE_FAILED)

    assert (ok["Succeeded"]["status"], ok["Ready"]["status"], ok["Reconciling"]["status"]) == ("True", "True", "False")
    assert (bad["Succeeded"]["status"], bad["Failed"]["status"], bad["Stalled"]["status"]) == ("False", "True", "True")
    assert bad["Failed"]["reason"] == r.STAGE_FAILED


def test_a_suspended_job_is_not_reconciling_and_says_why() -> None:
    c = conditions_of("Suspended", reason=r.SUSPENDED_BY_USER, suspended=True)

    assert c["Suspended"]["status"] == "True"
    assert c["Running"]["status"] == "False"
    assert c["Reconciling"]["status"] == "False"
    assert c["Ready"]["reason"] == r.SUSPENDED_BY_USER


def test_last_transition_time_moves_only_when_the_status_changes() -> None:
    first = job_conditions([], 1, phase="Running", reason=r.STAGE_RUNNING, message="stage 1")
    for c in first:
        c["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    time.sleep(0.01)

    second = job_conditions(first, 1, phase="Running", reason=r.STAGE_RUNNING, message="stage 2")
    third = job_conditions(second, 1, phase="Succeeded", reason=r.ALL_STAGES_SUCCEEDED, message="done")

    assert find_condition(second, "Running") == {**find_condition(first, "Running"), "message": "stage 2"}  # type: ignore[dict-item]
    assert find_condition(third, "Running")["lastTransitionTime"] != "2000-01-01T00:00:00Z"  # type: ignore[index]
    assert find_condition(third, "Accepted")["lastTransitionTime"] == "2000-01-01T00:00:00Z"  # type: ignore[index]


def test_the_trainers_failure_record_is_picked_out_of_the_log_tail() -> None:
    tail = (
        "2026-11-27 23:07:14,356 INFO [rank0] kubetune_trainer: Started stage job=j stage=pretrain\n"
        "2026-11-27 23:07:14,489 ERROR [rank0] kubetune_trainer: Failed stage exitCode=1 (permanent): DataError: "
        "data set pvc://data/broken.jsonl is not valid (1 of 3 rows have problems):\n"
        '  line 2: missing "text"\n'
        "E1127 23:07:16.503000 23126 torch/distributed/elastic/multiprocessing/api.py:986] failed (exitcode: 1)\n"
        "2026-11-27 23:07:16,504 ERROR [agent] kubetune_trainer: Failed worker rank=0 exitCode=1\n"
    )

    words = last_words(tail)

    assert words.endswith('(1 of 3 rows have problems): line 2: missing "text"')
    assert "Failed stage exitCode=1 (permanent): DataError" in words
    assert last_words("a\nb\nc\nd") == "b c d"


def test_a_failed_pod_tells_its_exit_code_meaning_and_last_words() -> None:
    pods = [{"metadata": {"name": "pipe-sft-worker-0", "namespace": "ns"}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "pytorch", "state": {"terminated": {"exitCode": 1, "message": "DataError: line 7: no 'chosen'"}}}]}},
        {"metadata": {"name": "pipe-sft-master-0", "namespace": "ns"}, "status": {"phase": "Running"}}]

    text = failure_detail(pods)

    assert "pod pipe-sft-worker-0 exited with code 1 (a permanent error" in text
    assert "line 7: no 'chosen'" in text
    assert "kubectl logs -n ns pipe-sft-worker-0" in text


def test_a_pytorchjob_deleted_under_a_running_stage_fails_the_stage_instead_of_running_it_again() -> None:
    previous = [{"name": "pretrain", "state": "Succeeded", "jobName": "pipe-pretrain"},
                {"name": "sft", "state": "Running", "jobName": "pipe-sft", "step": 40}]

    plan = observe_stages(JOB, {}, previous, OUT)

    assert (plan.phase, plan.index, plan.reason) == ("Failed", 1, r.STAGE_DELETED)
    assert "PyTorchJob pipe-sft was deleted before the stage's result was recorded" in plan.message
    assert [s["state"] for s in plan.stages] == ["Succeeded", "Failed", "Pending"]
    # a stage never created is started; one recorded final keeps its state
    assert observe_stages(JOB, {}, previous[:1], OUT).phase == "Start"


def test_a_stage_waits_for_a_dataset_edited_since_it_was_validated() -> None:
    """Ready=True speaks of the generation it validated: columns or schema edited after that are
    not used until the new generation is validated."""
    body = pipeline()
    body["spec"]["stages"][2]["dataset"] = {"preferenceDatasetRef": {"name": "prefs"}}
    job = FineTuneJob.model_validate(body)
    dataset = {"apiVersion": "kubetune.io/v1alpha1", "kind": "PreferenceDataset",
               "metadata": {"name": "prefs", "namespace": "ns", "generation": 2},
               "spec": {"source": {"uri": "pvc://data/prefs.jsonl"}, "schema": "paired"},
               "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Valid", "observedGeneration": 1,
                                          "message": "1000 rows"}]}}
    plan = Plan(stages=[{"state": "Succeeded"}, {"state": "Succeeded"}, {"state": "Pending"}], phase=Phase.START, index=2)

    start_stage(body, job, plan, {"prefs": dataset}, OUT)

    assert (plan.phase, plan.reason) == ("Waiting", r.WAITING_FOR_DATASET)
    assert "its spec changed (generation 2) since it was validated (generation 1)" in plan.message


def test_credentials_in_a_failed_pods_last_words_are_redacted() -> None:
    leaked = ("2026-11-29 10:00:00 ERROR Failed stage exitCode=1 (permanent): StorageError: s3://data/x.jsonl: "
              "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG key AKIAIOSFODNN7EXAMPLE, url https://user:hunter2@hub.example/x, "
              "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload, HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123")
    pods = [{"metadata": {"name": "p-master-0", "namespace": "ns"}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "pytorch", "state": {"terminated": {"exitCode": 1, "message": leaked}}}]}}]

    text = failure_detail(pods)

    for secret in ("wJalrXUtnFEMI", "AKIAIOSFODNN7EXAMPLE", "hunter2", "eyJhbGci", "hf_abcdef"):
        assert secret not in text
    assert "StorageError: s3://data/x.jsonl" in text and "AWS_SECRET_ACCESS_KEY=<redacted>" in text
    assert "https://<redacted>@hub.example/x" in text


@pytest.mark.parametrize(("change", "fragment"), [
    ({"output": {}}, "spec.output.uri: is not set"),
    ({"output": {"uri": "file:///tmp/out"}}, "is not shared storage"),
    ({"model": {"uri": "file:///models/base"}}, "spec.model.uri: file:///models/base is a path on one machine"),
])
def test_specs_a_cluster_cannot_run_are_refused_with_the_fix(change: dict[str, Any], fragment: str) -> None:
    body = pipeline(**change)

    _, problems = check(body)

    assert any(fragment in p for p in problems), problems


def test_qlora_without_gpus_and_unimplemented_stages_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from kubetune.api import registry

    # every vision stage has its recipe now: stand diffusion's row in for one that has none yet
    monkeypatch.setitem(registry.STAGE_TYPES, "diffusion", replace(registry.get("diffusion"), implemented=False))
    body = pipeline()
    body["spec"]["stages"][1]["tuning"] = {"method": "qlora"}
    body["spec"]["stages"].append({"name": "diffusion", "type": "diffusion",
                                   "dataset": {"uri": "pvc://d/x", "format": "imageCaption"}})

    _, problems = check(body)

    assert any(p.startswith("spec.stages[1].resources.gpusPerNode: QLoRA") for p in problems)
    assert any(p.startswith("spec.stages[3].type: stage type diffusion is not implemented yet") for p in problems)
    assert check(pipeline())[1] == []


def test_a_lora_pipeline_publishes_its_last_adapter_on_the_previous_stages_merged_model() -> None:
    job = FineTuneJob.model_validate(pipeline(publish={"gpus": 2}))
    merged = FineTuneJob.model_validate(pipeline(output={"uri": OUT, "merge": True}))

    spec = adapter_spec(job, OUT)

    assert spec == {"baseModelUri": f"{OUT}/sft/merged", "adapterUri": f"{OUT}/dpo",
                    "serving": {"runtime": "vllm", "gpus": 2, "shareServer": True}}
    assert adapter_spec(merged, OUT)["mergedUri"] == f"{OUT}/dpo/merged"


def test_a_published_ia3_stage_is_merged_and_served_whole() -> None:
    """vLLM serves LoRA adapters, not IA3 ones: the last stage writes merged weights, which are published."""
    body = pipeline(publish={})
    body["spec"]["stages"][2]["tuning"] = {"method": "ia3"}
    job = FineTuneJob.model_validate(body)

    assert check(body)[1] == []
    assert adapter_spec(job, OUT)["mergedUri"] == f"{OUT}/dpo/merged"
    assert render_stage_run(job, 2, OUT).merge
    unpublished = FineTuneJob.model_validate(pipeline())
    unpublished.spec.stages[2].tuning.method = "ia3"
    assert not render_stage_run(unpublished, 2, OUT).merge  # nothing asks for merged weights


def test_a_stage_after_an_unmergeable_adapter_keeps_training_it_on_the_same_base() -> None:
    body = pipeline()
    body["spec"]["stages"] = [
        {"name": "sft", "type": "sft", "dataset": {"uri": "pvc://d/sft.jsonl", "format": "promptCompletion"}},
        *({"name": n, "type": "sft", "dataset": {"uri": f"pvc://d/{n}.jsonl", "format": "promptCompletion"},
           "tuning": {"method": "promptTuning"}} for n in ("cue", "cue-more")),
    ]
    job = FineTuneJob.model_validate(body)

    assert check(body)[1] == []
    cue, more = render_stage_run(job, 1, OUT), render_stage_run(job, 2, OUT)
    assert (cue.model_uri, cue.adapter_uri) == (f"{OUT}/sft", None)
    assert (more.model_uri, more.adapter_uri) == (f"{OUT}/sft", f"{OUT}/cue")
    assert not cue.merge and not more.merge
    assert adapter_spec(job, OUT) | {"serving": {}} == {
        "baseModelUri": f"{OUT}/sft", "adapterUri": f"{OUT}/cue-more", "serving": {}}

    body["spec"]["stages"][2]["tuning"] = {"method": "lora"}
    assert any(p.startswith("spec.stages[2].tuning.method: stage cue-more starts from what stage cue trained "
                            "with tuning.method promptTuning") for p in check(body)[1])


def test_the_jobs_by_condition_gauge_counts_each_job_once() -> None:
    metrics.set_job_conditions("ns/a", {"Running", "Accepted"})
    metrics.set_job_conditions("ns/b", {"Running"})
    metrics.set_job_conditions("ns/a", {"Succeeded", "Ready"})

    value = lambda c: metrics.REGISTRY.get_sample_value("kubetune_finetunejobs", {"condition": c})  # noqa: E731
    assert (value("Running"), value("Succeeded"), value("Accepted")) == (1.0, 1.0, 0.0)
    metrics.set_job_conditions("ns/a", None)
    metrics.set_job_conditions("ns/b", None)
    assert value("Running") == 0.0


def test_a_stage_kueue_holds_waits_in_its_queue_and_one_the_user_suspended_is_suspended() -> None:
    def queued(*conditions: str) -> dict[str, Any]:  # a PyTorchJob Kueue suspended until it admits it
        return {**child(*conditions), "metadata": {"labels": {"kueue.x-k8s.io/queue-name": "gpus"}},
                "spec": {"runPolicy": {"suspend": True}}}
    waiting = observe_stages(JOB, {"pipe-pretrain": queued("Created", "Suspended")}, [], OUT)
    new = observe_stages(JOB, {"pipe-pretrain": queued()}, [], OUT)  # before the training-operator saw it
    suspended_job = FineTuneJob.model_validate(pipeline(runPolicy={"suspend": True}))
    by_user = observe_stages(suspended_job, {"pipe-pretrain": queued("Created", "Suspended")}, [], OUT)

    assert (waiting.phase, waiting.reason, waiting.stages[0]["state"]) == (Phase.PENDING, r.STAGE_QUEUED, "Pending")
    assert waiting.message == "Stage 1/3 pretrain waits in Kueue LocalQueue gpus (PyTorchJob pipe-pretrain)."
    assert (new.phase, new.reason) == (Phase.PENDING, r.STAGE_QUEUED)
    assert (by_user.phase, by_user.reason, by_user.stages[0]["state"]) == (Phase.SUSPENDED, r.STAGE_SUSPENDED, "Suspended")


def test_kueues_reason_for_a_workload_it_has_not_admitted() -> None:
    from kubetune.backends import kueue

    def workload(active: bool = True, **conditions: tuple[str, str]) -> dict[str, Any]:
        return {"spec": {"active": active}, "status": {"conditions": [
            {"type": t, "status": s, "reason": t, "message": m} for t, (s, m) in conditions.items()]}}
    quota = "couldn't assign flavors to pod set worker: insufficient unused quota for nvidia.com/gpu in flavor f"
    assert kueue.why_waiting(workload(QuotaReserved=("False", quota))) == quota
    assert kueue.why_waiting(workload(QuotaReserved=("True", "reserved"), Admitted=("True", "admitted"))) == ""
    assert kueue.why_waiting(workload(False)) == "its Kueue Workload is deactivated"
    assert kueue.why_waiting(workload(Evicted=("True", "preempted by a job of higher priority"))) == \
        "evicted by Kueue (Evicted): preempted by a job of higher priority"
    assert kueue.active_patch(False) == {"metadata": {"annotations": {kueue.DEACTIVATED_BY: "spec.runPolicy.suspend"}},
                                         "spec": {"active": False}}
    assert kueue.deactivated_by_us({"metadata": {"annotations": {kueue.DEACTIVATED_BY: "spec.runPolicy.suspend"}}})


def test_a_master_pod_replaced_without_a_restarting_condition_is_counted_once() -> None:
    from kubetune.controllers.pipeline import count_restart, note_master_pod

    def pod(uid: str, created: str) -> dict[str, Any]:
        return {"metadata": {"uid": uid, "creationTimestamp": created}}
    entry: dict[str, Any] = {}
    note_master_pod(entry, pod("a", "2025-01-01T00:00:00Z"))
    note_master_pod(entry, pod("a", "2025-01-01T00:00:00Z"))
    assert entry.get("restarts") is None  # the first pod, seen twice
    note_master_pod(entry, pod("b", "2025-01-01T00:05:00Z"))  # deleted, or lost with its node: replaced
    assert (entry["restarts"], entry["lastRestartTime"], entry["masterPodUID"]) == (1, "2025-01-01T00:05:00Z", "b")
    count_restart(entry, "2025-01-01T00:09:00Z")  # the training-operator's Restarting condition
    note_master_pod(entry, pod("c", "2025-01-01T00:09:01Z"))  # its replacement: not counted again
    assert (entry["restarts"], entry["masterPodUID"]) == (2, "c")
