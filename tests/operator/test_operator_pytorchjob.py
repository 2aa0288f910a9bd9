"""A FineTuneJob stage rendered into a PyTorchJob: the spec the training-operator receives."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api import FineTuneJob, StageRun, render_stage_run
from kubetune.backends import BackendSettings, child_name, pod_annotations
from kubetune.backends import pytorchjob as backend


def make_job(stages: list[dict[str, Any]] | None = None, **spec: Any) -> FineTuneJob:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "assistant", "namespace": "team-a", "uid": "u-1"},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "stages": stages or [{
                "name": "sft", "type": "sft",
                "dataset": {"uri": "pvc://data/chat.jsonl", "format": "messages"},
                "tuning": {"method": "lora"},
                "resources": {"nodes": 2, "gpusPerNode": 8, "memory": "200Gi",
                              "nodeSelector": {"nvidia.com/gpu.product": "H100"},
                              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
            }],
            "output": {"uri": "pvc://models/assistant"},
            **spec,
        },
    }
    return FineTuneJob.model_validate(body)


def render(job: FineTuneJob, index: int = 0, settings: BackendSettings | None = None) -> tuple[StageRun, dict[str, Any]]:
    run = render_stage_run(job, index, job.spec.output.uri or "", metrics_port=9310)
    return run, backend.render(job, index, run, settings or BackendSettings(trainer_image="trainer:test"))


def pod(pj: dict[str, Any], replica: str = "Master") -> dict[str, Any]:
    return pj["spec"]["pytorchReplicaSpecs"][replica]["template"]


def container(pj: dict[str, Any], replica: str = "Master") -> dict[str, Any]:
    (c,) = pod(pj, replica)["spec"]["containers"]
    return c


def test_two_nodes_of_eight_gpus_are_a_master_and_a_worker_with_eight_processes_each() -> None:
    _, pj = render(make_job())

    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert pj["apiVersion"] == "kubeflow.org/v1" and pj["kind"] == "PyTorchJob"
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 1}
    assert pj["spec"]["nprocPerNode"] == "8"
    assert all(v["restartPolicy"] == "ExitCode" for v in replicas.values())
    c = container(pj, "Worker")
    assert c["name"] == "pytorch"
    assert c["image"] == "trainer:test"
    assert c["command"] == ["kubetune-train", "/etc/kubetune/stagerun.json"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8, "memory": "200Gi"}
    assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in c["ports"]
    assert {"name": "metrics", "containerPort": 9310, "protocol": "TCP"} in c["ports"]


def test_one_cpu_node_is_a_master_alone_with_one_process_and_no_gpu() -> None:
    job = make_job([{"name": "pretrain", "type": "pretrain", "dataset": {"uri": "pvc://data/t.jsonl", "format": "text"},
                     "resources": {"gpusPerNode": 0}}])

    _, pj = render(job)

    assert list(pj["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert pj["spec"]["nprocPerNode"] == "1"
    assert "nvidia.com/gpu" not in container(pj).get("resources", {}).get("limits", {})


def test_pods_mount_the_stagerun_shm_and_claims_where_the_trainer_looks() -> None:
    run, pj = render(make_job())

    spec = pod(pj)["spec"]
    mounts = {m["mountPath"]: m for m in container(pj)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = {e["name"]: e.get("value") for e in container(pj)["env"]}
    assert env["KUBETUNE_PVC_ROOT"] == "/mnt/pvc"
    assert volumes[mounts["/etc/kubetune"]["name"]]["configMap"]["name"] == "assistant-sft"
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes[mounts["/cache"]["name"]]["emptyDir"] == {}
    models = volumes[mounts["/mnt/pvc/models"]["name"]]["persistentVolumeClaim"]
    data = volumes[mounts["/mnt/pvc/data"]["name"]]["persistentVolumeClaim"]
    assert models == {"claimName": "models", "readOnly": False}
    assert data == {"claimName": "data", "readOnly": True}
    assert run.output_uri == "pvc://models/assistant/sft"
    assert "envFrom" not in container(pj)


def test_the_configmap_holds_the_stagerun_the_trainer_reads() -> None:
    job = make_job()
    run, _ = render(job)

    cm = backend.stagerun_configmap(job, 0, run)

    assert cm["metadata"]["name"] == "assistant-sft"
    back = StageRun.model_validate_json(cm["data"]["stagerun.json"])
    assert back == run
    assert back.model_uri == "hf://Qwen/Qwen2.5-0.5B"
    assert back.output_uri == "pvc://models/assistant/sft"


def test_scheduling_follows_the_stage_and_the_queue() -> None:
    kueue = make_job(runPolicy={"backoffLimit": 3, "activeDeadlineSeconds": 3600, "queue": {"name": "team-a"}})
    volcano = make_job(runPolicy={"queue": {"name": "gpu", "provider": "volcano"}})

    _, pj = render(kueue)
    _, vj = render(volcano)

    spec = pod(pj)["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert pj["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "suspend": False, "backoffLimit": 3,
                                       "activeDeadlineSeconds": 3600}
    assert pod(vj)["spec"]["schedulerName"] == "volcano"
    assert pod(vj)["metadata"]["annotations"]["scheduling.volcano.sh/queue-name"] == "gpu"
    assert vj["spec"]["runPolicy"]["schedulingPolicy"] == {"queue": "gpu", "minAvailable": 2}
    assert "kueue.x-k8s.io/queue-name" not in vj["metadata"]["labels"]


def test_a_suspended_job_renders_a_suspended_pytorchjob_marked_as_ours() -> None:
    _, pj = render(make_job(runPolicy={"suspend": True}))

    assert pj["spec"]["runPolicy"]["suspend"] is True
    assert backend.suspended_by_us(pj)
    assert backend.suspend_patch(False)["metadata"]["annotations"] == {backend.SUSPENDED_BY: None}


def test_pods_satisfy_podsecurity_restricted_unless_turned_off() -> None:
    _, pj = render(make_job())
    _, loose = render(make_job(), settings=BackendSettings(restricted_security_context=False))

    assert pod(pj)["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod(pj)["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container(pj)["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
    }
    writable = {m["mountPath"] for m in container(pj)["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/cache", "/dev/shm"} <= writable
    env = {e["name"]: e["value"] for e in container(pj)["env"]}
    assert env["HOME"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
    assert "securityContext" not in pod(loose)["spec"] and "securityContext" not in container(loose)


def test_trainer_pods_get_no_service_account_token() -> None:
    _, pj = render(make_job(stages=[{"name": "sft", "type": "sft", "dataset": {"uri": "s3://d/x.jsonl", "format": "messages"},
                                     "resources": {"nodes": 2}}]), settings=BackendSettings(service_account="trainer"))

    for replica in ("Master", "Worker"):
        assert pod(pj, replica)["spec"]["automountServiceAccountToken"] is False
        assert pod(pj, replica)["spec"]["serviceAccountName"] == "trainer"


def test_a_stage_restarts_at_most_three_times_unless_told() -> None:
    """The training-operator applies no limit when backoffLimit is nil, and the trainer marks an
    OOM retryable: without a default a repeatable OOM would restart forever."""
    _, default = render(make_job())
    _, told = render(make_job(runPolicy={"backoffLimit": 0}))

    assert default["spec"]["runPolicy"]["backoffLimit"] == 3
    assert told["spec"]["runPolicy"]["backoffLimit"] == 0


def test_s3_stages_read_credentials_from_an_optional_secret() -> None:
    job = make_job(output={"uri": "s3://bucket/runs/assistant"})

    _, pj = render(job, settings=BackendSettings(storage_secret="aws"))

    assert container(pj)["envFrom"] == [{"secretRef": {"name": "aws", "optional": True}}]


def test_pod_annotations_are_copied_for_every_stage_and_for_one_stage() -> None:
    job = make_job()
    job.metadata.annotations = {
        "kubetune.io/pod-annotations": json.dumps({"sidecar.istio.io/inject": "false"}),
        "kubetune.io/pod-annotations.sft": json.dumps({"kwok.kubetune.io/fail": "true"}),
        "unrelated": "x",
    }

    _, pj = render(job)

    assert pod(pj)["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false", "kwok.kubetune.io/fail": "true"}
    assert pod_annotations(job.metadata.annotations, "other") == {"sidecar.istio.io/inject": "false"}
    with pytest.raises(ValueError, match="JSON object"):
        pod_annotations({"kubetune.io/pod-annotations": "[1]"})


def test_names_are_job_dash_stage_and_long_ones_are_shortened_with_a_hash() -> None:
    long_job = "a-very-long-finetunejob-name-that-goes-on-and-on"

    short = backend.job_name("assistant", "sft")
    long_a = backend.job_name(long_job, "preference-alignment")
    long_b = backend.job_name(long_job, "preference-alignment-2")

    assert short == "assistant-sft"
    assert len(long_a) <= backend.MAX_NAME and len(f"{long_a}-worker-511") <= 63
    assert long_a == backend.job_name(long_job, "preference-alignment")
    assert long_a != long_b
    assert long_a.startswith("a-very-long-finetunejob")
    assert child_name("my.job", "sft") != "my.job-sft" and "." not in child_name("my.job", "sft")
    assert child_name("1job", "sft")[0].isalpha()


@pytest.mark.parametrize(("conditions", "state"), [
    ([], "Pending"),
    ([("Created", "True")], "Pending"),
    ([("Created", "True"), ("Running", "True")], "Running"),
    ([("Created", "True"), ("Running", "False"), ("Restarting", "True")], "Restarting"),
    ([("Created", "True"), ("Running", "False"), ("Succeeded", "True")], "Succeeded"),
    ([("Created", "True"), ("Running", "False"), ("Failed", "True")], "Failed"),
    ([("Created", "True"), ("Suspended", "True")], "Suspended"),
])
def test_the_stage_state_comes_from_the_pytorchjob_conditions(conditions: list[tuple[str, str]], state: str) -> None:
    pj = {"status": {"conditions": [{"type": t, "status": s, "reason": f"PyTorchJob{t}", "message": "m"}
                                    for t, s in conditions]}}

    assert backend.observe(pj)[0] == state
