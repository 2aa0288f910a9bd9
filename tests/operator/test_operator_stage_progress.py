"""A running stage's status: restarts, the newest checkpoint, and tokens or samples trained."""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJob
from kubetune.api.finetunejob import FineTuneJobStatus
from kubetune.backends import trainer_metrics
from kubetune.controllers.finetunejob import apply_progress
from kubetune.controllers.pipeline import observe_stages, restarted_at

OUT = "pvc://models/ft"
JOB = FineTuneJob.model_validate({
    "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "ft", "namespace": "ns", "uid": "u-1", "generation": 1},
    "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B"}, "output": {"uri": OUT}, "stages": [
        {"name": "sft", "type": "sft", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "messages"}}]},
})


def pytorchjob(*conditions: tuple[str, str, str]) -> dict[str, Any]:
    """A PyTorchJob with (type, status, lastTransitionTime) conditions, as the training-operator writes them."""
    return {"status": {"startTime": "2025-01-01T00:00:00Z", "conditions": [
        {"type": t, "status": s, "reason": f"PyTorchJob{t}", "message": "", "lastTransitionTime": at}
        for t, s, at in conditions]}}


CREATED = ("Created", "True", "2025-01-01T00:00:00Z")


def observe(child: dict[str, Any], previous: list[dict[str, Any]],
            seen: dict[str, str] | None = None) -> dict[str, Any]:
    return observe_stages(JOB, {"ft-sft": child}, previous, OUT, seen).stages[0]


def test_each_restart_of_a_stages_pods_is_counted_once() -> None:
    running = observe(pytorchjob(CREATED, ("Running", "True", "2025-01-01T00:00:05Z")), [])
    assert running["restarts"] == 0 and "lastRestartTime" not in running

    first = pytorchjob(CREATED, ("Restarting", "True", "2025-01-01T00:01:00Z"))
    restarting = observe(first, [running])
    assert (restarting["state"], restarting["restarts"]) == ("Restarting", 1)
    assert restarting["lastRestartTime"] == "2025-01-01T00:01:00Z"
    # the same restart read again (another event, a timer tick, the operator restarted): still one
    assert observe(first, [restarting])["restarts"] == 1
    # the training-operator drops Restarting when the pods run again; the count stays
    again = observe(pytorchjob(CREATED, ("Running", "True", "2025-01-01T00:01:10Z")), [restarting])
    assert (again["state"], again["restarts"]) == ("Running", 1)
    second = observe(pytorchjob(CREATED, ("Restarting", "True", "2025-01-01T00:05:00Z")), [again])
    assert second["restarts"] == 2


def test_a_restart_only_a_watch_event_showed_is_counted() -> None:
    """By the time the reconcile reads the PyTorchJob its pods may run again: the event's restart counts."""
    event = pytorchjob(CREATED, ("Restarting", "True", "2025-01-01T00:01:00Z"))
    at = restarted_at(event)
    assert at == "2025-01-01T00:01:00Z"
    now = pytorchjob(CREATED, ("Running", "True", "2025-01-01T00:01:03Z"))
    assert restarted_at(now) is None
    entry = observe(now, [{"name": "sft", "type": "sft", "state": "Running", "jobName": "ft-sft", "restarts": 0}],
                    {"ft-sft": at})
    assert (entry["state"], entry["restarts"], entry["lastRestartTime"]) == ("Running", 1, at)


def test_progress_shows_the_newest_checkpoint_and_tokens_trained_of_a_text_stage() -> None:
    entry: dict[str, Any] = {"name": "sft", "type": "sft", "state": "Running", "startTime": "2025-01-01T00:00:00Z"}
    got = trainer_metrics.TrainerProgress(step=45, total_steps=100, metrics={"loss": 1.5}, tokens=23040, samples=360,
                                          checkpoint_step=40)
    apply_progress(entry, got, f"{OUT}/sft", True)
    assert entry["lastCheckpoint"] == {"step": 40, "uri": f"{OUT}/sft/checkpoint-40"}
    assert entry["tokensTrained"] == 23040 and "samplesTrained" not in entry
    assert entry["step"] == 45
    # what the operator writes passes the CRD's status schema
    status = FineTuneJobStatus.model_validate({"stages": [{**entry, "restarts": 1,
                                                           "lastRestartTime": "2025-01-01T00:01:00Z"}]})
    stage = status.to_wire()["stages"][0]
    assert stage["lastCheckpoint"] == {"step": 40, "uri": f"{OUT}/sft/checkpoint-40"}
    assert (stage["tokensTrained"], stage["restarts"]) == (23040, 1)


def test_an_image_stage_counts_samples_and_no_checkpoint_is_shown_before_the_first() -> None:
    entry: dict[str, Any] = {"name": "cls", "type": "imageClassification", "state": "Running"}
    apply_progress(entry, trainer_metrics.TrainerProgress(step=3, total_steps=10, tokens=0, samples=96),
                   f"{OUT}/cls", False)
    assert entry["samplesTrained"] == 96 and "tokensTrained" not in entry
    assert "lastCheckpoint" not in entry


def test_the_trainers_gauges_are_read_back() -> None:
    text = "\n".join([
        "# TYPE kubetune_trainer_step gauge", 'kubetune_trainer_step{finetunejob="ft",stage="sft"} 45.0',
        "# TYPE kubetune_trainer_tokens_trained gauge",
        'kubetune_trainer_tokens_trained{finetunejob="ft",stage="sft"} 23040.0',
        "# TYPE kubetune_trainer_samples_trained gauge",
        'kubetune_trainer_samples_trained{finetunejob="ft",stage="sft"} 360.0',
        "# TYPE kubetune_trainer_checkpoint_step gauge",
        'kubetune_trainer_checkpoint_step{finetunejob="ft",stage="sft"} -1.0', ""])
    got = trainer_metrics.parse(text)
    assert (got.step, got.tokens, got.samples, got.checkpoint_step) == (45, 23040, 360, None)
    assert trainer_metrics.parse(text.replace("} -1.0", "} 40.0")).checkpoint_step == 40
