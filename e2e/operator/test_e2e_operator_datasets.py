"""PreferenceDatasets validated by a real validator run, and the jobs that read them.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_datasets.py

The validation Job's pod is held Running by KWOK; `Kubelet` (conftest) runs its container
command here, with the pod's environment and its claims mapped to local folders, and
writes the exit code and termination message into the pod's status, as the kubelet would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kubernetes import client

from e2e.conftest import Cluster, wait_for
from e2e.operator.conftest import (
    FTJ,
    HOLD,
    PREFDS,
    PYTORCHJOBS,
    Kubelet,
    Operator,
    Workspace,
    apply,
    condition,
    events,
    finetunejob,
    get,
    pod_annotations,
    stage,
)

ROWS = [{"prompt": f"{w} reversed:", "chosen": " ".join(reversed(w.split())), "rejected": w}
        for w in ("a b c", "d e f", "g h i", "j k l", "m n o", "p q r", "s t u", "v w x", "y z a", "b c d")]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> str:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def preference_dataset(name: str, uri: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "PreferenceDataset",
            "metadata": {"name": name, "annotations": pod_annotations(HOLD)},
            "spec": {"source": {"uri": uri}, "schema": "paired", "split": {"validationFraction": 0.2}, **spec}}


def word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (one token per word of ROWS) saved as a model folder holds it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for r in ROWS for text in r.values() for w in text.split()})
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(folder)


def dpo_job(name: str, dataset: str) -> dict[str, Any]:
    return finetunejob(name, [stage("dpo", "dpo", None, None, dataset={"preferenceDatasetRef": {"name": dataset}},
                                    tuning={"method": "lora"})])


def run_validation_pod(admin_api: client.ApiClient, kubelet: Kubelet, namespace: str, dataset: str) -> int:
    core = client.CoreV1Api(admin_api)
    pod = wait_for(f"the validation pod of {dataset} to run", lambda: next(
        (p for p in core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={dataset}-validate-1").items
         if p.status.phase == "Running"), None), timeout=60)
    kubelet.start(namespace, pod.metadata.name)
    return kubelet.wait(namespace, pod.metadata.name, timeout=120)


def test_a_bad_row_makes_the_dataset_invalid_with_its_line_and_the_job_reading_it_fails(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace, kubelet: Kubelet
) -> None:
    ns = workspace.namespace
    rows = [dict(r) for r in ROWS]
    del rows[2]["rejected"]
    checksum = write_rows(workspace.pvc_root / "data" / "bad.jsonl", rows)
    apply(cluster, preference_dataset("bad", "pvc://data/bad.jsonl"), dpo_job("reads-bad", "bad"), namespace=ns)
    waiting = wait_for("the job to wait for its data", lambda: (j := get(admin_api, FTJ, ns, "reads-bad"))
                       and condition(j, "Running").get("reason") == "WaitingForPreferenceDataset" and j, timeout=60)
    assert "waits for PreferenceDataset bad to become Ready" in condition(waiting, "Running")["message"]

    assert run_validation_pod(admin_api, kubelet, ns, "bad") == 1

    ds = wait_for("the data set to be judged", lambda: (d := get(admin_api, PREFDS, ns, "bad"))
                  and condition(d, "Ready").get("reason") == "Invalid" and d, timeout=60)
    status = ds["status"]
    assert condition(ds, "Ready")["status"] == "False"
    assert (status["rows"], status["validRows"], status["checksum"]) == (10, 9, checksum)
    assert status["errors"][0]["line"] == 3 and 'missing "rejected"' in status["errors"][0]["reason"]
    assert condition(ds, "Ready")["message"].startswith('1 of 10 rows are invalid: line 3: missing "rejected"')
    cluster.kubectl("wait", "--for=condition=Failed", "-n", ns, "ftj/reads-bad", "--timeout=60s", timeout=90)
    failed = condition(get(admin_api, FTJ, ns, "reads-bad"), "Failed")
    assert failed["reason"] == "PreferenceDatasetInvalid"
    assert "Stage 1/1 dpo reads PreferenceDataset bad, which is not valid: 1 of 10 rows are invalid: line 3" \
        in failed["message"]
    assert get(admin_api, PYTORCHJOBS, ns, "reads-bad-dpo") is None
    assert any(e.reason == "Invalid" for e in events(admin_api, ns, "bad", kind="PreferenceDataset"))


def test_a_good_dataset_becomes_ready_and_the_job_reading_it_is_given_it(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace, kubelet: Kubelet
) -> None:
    """The job waits for the data set, then its stage's StageRun names the validated file with the
    held-out fraction the data set declared. (KWOK plays the stage's pods, so nothing trains here;
    e2e/operator/test_e2e_operator_execute.py is where rendered pods train for real.)"""
    ns = workspace.namespace
    checksum = write_rows(workspace.pvc_root / "data" / "good.jsonl", ROWS)
    word_tokenizer(workspace.pvc_root / "models" / "words")
    apply(cluster, preference_dataset("good", "pvc://data/good.jsonl", tokenizerUri="pvc://models/words"),
          dpo_job("reads-good", "good"), namespace=ns)

    assert run_validation_pod(admin_api, kubelet, ns, "good") == 0

    ds = wait_for("the data set to be Ready", lambda: (d := get(admin_api, PREFDS, ns, "good"))
                  and condition(d, "Ready").get("status") == "True" and d, timeout=60)
    status = ds["status"]
    assert (status["rows"], status["validRows"], status["trainRows"], status["validationRows"]) == (10, 10, 8, 2)
    assert status["checksum"] == checksum and status["errors"] == []
    # "a b c reversed:" is 4 words, "c b a" and "a b c" 3: one token each
    assert status["tokenStats"] == {"promptMean": 4.0, "promptMax": 4.0, "chosenMean": 3.0, "chosenMax": 3.0,
                                    "rejectedMean": 3.0, "rejectedMax": 3.0}
    assert condition(ds, "Ready")["reason"] == "Valid"
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, "ftj/reads-good", "--timeout=90s", timeout=120)
    run = json.loads(client.CoreV1Api(admin_api).read_namespaced_config_map("reads-good-dpo", ns).data["stagerun.json"])
    assert run["dataset"] == {"uri": "pvc://data/good.jsonl", "format": "preference", "validationFraction": 0.2}
