"""PreferenceDataset validation Jobs and their reports; ModelAdapters as InferenceServices;
the trainer's metrics read back as progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from kubetune.api import PreferenceDataset
from kubetune.api.modeladapter import ModelAdapter
from kubetune.backends import BackendSettings, trainer_metrics
from kubetune.backends import validation
from kubetune.controllers.preferencedataset import invalid_message, summary
from kubetune.publish import kserve


def dataset(**spec: Any) -> PreferenceDataset:
    return PreferenceDataset.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "PreferenceDataset",
        "metadata": {"name": "prefs", "namespace": "ns", "generation": 2},
        "spec": {"source": {"uri": "pvc://data/pairs.jsonl"}, "schema": "paired",
                 "columns": {"prompt": "question"}, **spec},
    })


def test_the_validation_job_runs_the_validator_and_reports_through_the_termination_message() -> None:
    settings = BackendSettings(trainer_image="trainer:test", validation_tolerations=[{"key": "k", "operator": "Exists"}])

    job = validation.render(dataset(), settings)

    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert job["metadata"]["name"] == "prefs-validate-2"
    assert c["command"][-9:] == ["kubetune-train", "validate", "--format", "preference", "--columns=prompt=question",
                                 "--max-errors", "20", "--json", "pvc://data/pairs.jsonl"]
    assert c["terminationMessagePath"] == "/dev/termination-log" and c["terminationMessagePolicy"] == "File"
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False  # it reads data and never calls the API server
    assert pod["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/mnt/pvc/data", "/cache", "/tmp"}
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [1, 2]


def test_a_large_report_is_cut_to_the_termination_message_limit_keeping_the_counts() -> None:
    report = {"rows": 100000, "validRows": 10, "checksum": "sha256:ab", "tokenStats": {"prompt": {"mean": 12.5}},
              "errors": [{"line": i, "reason": "x" * 500} for i in range(1, 5000)], "sample": ["huge"] * 1000}

    text = validation.compact(report)

    back = json.loads(text)
    assert len(text.encode()) <= 4096
    assert (back["rows"], back["validRows"], back["checksum"]) == (100000, 10, "sha256:ab")
    assert back["errors"][0] == {"line": 1, "reason": "x" * 200}
    assert "sample" not in back


def test_the_wrapper_writes_the_validators_report_and_keeps_its_exit_code(tmp_path: Path) -> None:
    report = tmp_path / "termination-log"
    printed = json.dumps({"rows": 3, "validRows": 2, "errors": [{"line": 2, "reason": "missing field 'chosen'"}]})
    script = f"import sys; print('reading'); print({printed!r}); sys.exit(1)"

    code = validation.main(["--report", str(report), "--", sys.executable, "-c", script])

    assert code == 1
    assert json.loads(report.read_text()) == {"rows": 3, "validRows": 2,
                                              "errors": [{"line": 2, "reason": "missing field 'chosen'"}]}


def test_a_validator_that_crashes_leaves_its_last_words(tmp_path: Path) -> None:
    report = tmp_path / "termination-log"

    code = validation.main(["--report", str(report), "--", sys.executable, "-c", "raise SystemExit('no such file')"])

    assert code == 1
    assert json.loads(report.read_text()) == {"error": "no such file"}


def test_the_report_in_a_pod_status_becomes_the_dataset_status() -> None:
    message = validation.compact({"rows": 40, "validRows": 38, "checksum": "sha256:cd",
                                  "tokenStats": {"prompt": {"mean": 7, "max": 20}, "chosen": {"mean": 3}},
                                  "errors": [{"line": 3, "reason": "empty 'rejected'"}, {"line": 9, "reason": "not JSON"}]})
    pod = {"status": {"containerStatuses": [{"name": "validate", "state": {"terminated": {"exitCode": 1, "message": message}}}]}}

    report = validation.read_report(pod)
    assert report is not None
    status = summary(report, 0.1)

    assert status == {"rows": 40, "validRows": 38, "checksum": "sha256:cd", "trainRows": 34, "validationRows": 4,
                      "tokenStats": {"promptMean": 7.0, "promptMax": 20.0, "chosenMean": 3.0},
                      "errors": [{"line": 3, "reason": "empty 'rejected'"}, {"line": 9, "reason": "not JSON"}]}
    assert invalid_message(report).startswith("2 of 40 rows are invalid: line 3: empty 'rejected'; line 9: not JSON.")


# --- ModelAdapter -> InferenceService -------------------------------------------------------


def adapter(name: str, **spec: Any) -> ModelAdapter:
    return ModelAdapter.model_validate({"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter",
                                        "metadata": {"name": name, "namespace": "ns"}, "spec": spec})


def test_a_merged_model_gets_its_own_vllm_inferenceservice() -> None:
    a = adapter("bot", mergedUri="pvc://models/bot/sft", servedModelName="support-bot", serving={"gpus": 2})

    isvc = kserve.render(kserve.service_name(a), "ns", [a])

    model = isvc["spec"]["predictor"]["model"]
    assert isvc["metadata"]["name"] == "bot"
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["storageUri"] == "pvc://models/bot/sft"
    assert model["args"] == ["--model_name=support-bot", "--backend=vllm"]
    assert model["resources"]["limits"] == {"nvidia.com/gpu": "2"}


def test_names_in_long_namespaces_leave_kserve_a_host_label_of_at_most_63_characters() -> None:
    """KServe (RawDeployment) names the predictor's host `<name>-predictor-<namespace>` and refuses to
    reconcile an InferenceService where that is longer than 63 characters: seen with its real
    controller, a shared server `models-demo-pretrain-0c224e` in a 30-character namespace."""
    def named(name: str, namespace: str, **spec: Any) -> ModelAdapter:
        return ModelAdapter.model_validate({"metadata": {"name": name, "namespace": namespace}, "spec": spec})

    for namespace in ("test-e2e-operator-kserve-81048", "team-" + "x" * 35):
        shared = named("puzzles", namespace, baseModelUri="pvc://models/demo/pretrain", adapterUri="pvc://models/demo/sft")
        whole = named("a-model-adapter-with-a-long-name", namespace, mergedUri="pvc://models/demo/sft")
        for a in (shared, whole):
            name = kserve.service_name(a)
            assert len(f"{name}-predictor-{namespace}") <= 63, name
            assert name == kserve.service_name(a)  # the same every time
    short = named("a-model-adapter-with-a-long-name", "ns", mergedUri="pvc://models/demo/sft")
    assert kserve.service_name(short) == "a-model-adapter-with-a-long-name"  # short namespaces: as before


def test_a_lora_rank_vllm_does_not_take_is_rendered_as_the_next_it_does() -> None:
    """vLLM refuses to start with --max-lora-rank 12 (it takes 1, 8, 16, 32, 64, ...): 12 is served as 16."""
    a = adapter("support", baseModelUri="hf://meta-llama/Llama-3.2-1B", adapterUri="pvc://models/support/sft",
                serving={"maxLoraRank": 12})
    args = kserve.render(kserve.service_name(a), "ns", [a])["spec"]["predictor"]["model"]["args"]
    assert "--max-lora-rank=16" in args
    assert [kserve.vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512, 1024)] == [1, 8, 8, 16, 64, 320, 512, 1024]


def test_adapters_on_one_base_share_one_server_as_lora_modules() -> None:
    base = "hf://meta-llama/Llama-3.2-1B"
    a = adapter("support", baseModelUri=base, adapterUri="pvc://models/support/sft", serving={"maxLoraRank": 16})
    b = adapter("sales", baseModelUri=base, adapterUri="s3://bucket/sales/dpo", serving={"maxLoraRank": 64})
    other = adapter("other", baseModelUri="hf://Qwen/Qwen2.5-0.5B", adapterUri="pvc://models/o")

    name = kserve.service_name(a)
    isvc = kserve.render(name, "ns", [a, b], storage_secret="aws")

    predictor = isvc["spec"]["predictor"]
    args = predictor["model"]["args"]
    assert kserve.service_name(b) == name != kserve.service_name(other)
    assert name.startswith("meta-llama-llama-3-2-1b-") and len(name) <= kserve.MAX_NAME
    assert predictor["model"]["storageUri"] == base
    assert args[:5] == [f"--model_name={name}", "--backend=vllm", "--enable-lora", "--max-lora-rank=64", "--max-loras=2"]
    assert args[5:] == ["--lora-modules", "sales=/mnt/adapters/sales", "support=/mnt/pvc/models/support/sft"]
    (init,) = predictor["initContainers"]
    assert init["args"] == ["s3://bucket/sales/dpo", "/mnt/adapters/sales"]
    assert init["envFrom"] == [{"secretRef": {"name": "aws", "optional": True}}]
    mounts = {m["mountPath"] for m in predictor["model"]["volumeMounts"]}
    assert mounts == {"/mnt/pvc/models", "/mnt/adapters"}
    assert isvc["metadata"]["labels"][kserve.LABEL_BASE_MODEL] == kserve.base_key(base)


def test_local_uris_cannot_be_served() -> None:
    assert kserve.unsupported_uri(adapter("x", mergedUri="file:///tmp/m")) is not None
    assert kserve.unsupported_uri(adapter("x", mergedUri="s3://b/m")) is None


def test_readiness_and_url_come_from_the_inferenceservice() -> None:
    ready = {"status": {"url": "http://bot.ns.example.com", "conditions": [{"type": "Ready", "status": "True"}]}}

    assert kserve.observe(ready) == (True, "", "http://bot.ns.example.com")
    assert kserve.observe({})[0] is False


# --- the trainer's metrics ------------------------------------------------------------------


def test_trainer_gauges_become_stage_progress() -> None:
    registry = CollectorRegistry()
    for name, value in (("step", 42), ("total_steps", 100), ("loss", 1.5), ("learning_rate", 2e-4), ("epoch", 0.4)):
        Gauge(f"kubetune_trainer_{name}", "h", ["job", "stage"], registry=registry).labels("j", "s").set(value)

    got = trainer_metrics.parse(generate_latest(registry).decode())

    assert (got.step, got.total_steps, got.percent) == (42, 100, 42)
    assert got.metrics == {"loss": 1.5, "learningRate": 0.0002, "epoch": 0.4}


def test_an_unreachable_trainer_is_no_progress_not_an_error() -> None:
    assert trainer_metrics.scrape("127.0.0.1", 9, timeout=0.5) is None


def test_a_tokenizer_uri_is_passed_to_the_validator_and_its_claim_mounted_read_only() -> None:
    settings = BackendSettings(trainer_image="trainer:test")

    job = validation.render(dataset(tokenizerUri="pvc://models/base"), settings)

    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert "--tokenizer=pvc://models/base" in c["command"]
    mounts = {m["mountPath"]: m.get("readOnly") for m in c["volumeMounts"]}
    assert mounts["/mnt/pvc/models"] is True and mounts["/mnt/pvc/data"] is True
    s3 = validation.render(dataset(tokenizerUri="s3://bucket/base"), settings)["spec"]["template"]["spec"]
    assert s3["containers"][0]["envFrom"] == [{"secretRef": {"name": settings.storage_secret, "optional": True}}]
