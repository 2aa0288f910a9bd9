"""Serving for real: the demo's pipeline, run by the operator, ends with its model answering chat
requests through the Deployment and Service that KServe's own controller made.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_kserve.py

KServe's controller manager (built from its Go module, e2e/kserve.py) runs in RawDeployment mode
with its webhooks, and kubetune-serve is its ClusterServingRuntime as the chart renders it (with
the fake nodes' toleration in `servingRuntime.tolerations`).

1. The demo's pipeline (examples/pipeline-tiny.yaml: a llama from model.init pretrained on the
   synthetic corpus, then SFT with LoRA on the letter puzzles) trains for real, each stage's pod
   run by the stand-in kubelet, and is published as the ModelAdapter `puzzles`. Three changes
   from the example: the SFT data are the puzzles as conversations (`sft_messages`: a chat
   request is what clients send), the model has 256 positions (the longest held-out
   conversations have more than 128 tokens) and the SFT stage is the shorter one of the vLLM CPU
   test (600 steps, rank 8); the DPO stage is left out, since it trains the whole model and the
   second adapter needs the LoRA stage's base. A second job trains a LoRA adapter on the same
   pretrained base to answer "yes" to every puzzle, published as `yes`.
2. The operator renders one InferenceService for both adapters (runtime kubetune, gpus 0); KServe's
   controller and webhooks turn it into a Deployment (the claim mounted at /mnt/models by its pod
   mutator) and a Service; the stand-in kubelet runs the predictor pod's container (the serving
   image's entrypoint, kubetune-serve) and marks it Ready when its readiness probe answers (KWOK
   leaves InferenceService pods unready, e2e/cluster/kwok-stages.yaml). KServe marks the
   InferenceService Ready, and both ModelAdapters mirror it.
3. Requests go to the Service KServe made: its port, its EndpointSlice's ready address and target
   port, that pod's port on this machine (there is no pod network here: the stand-in kubelet
   runs every pod's server on a port of its own). Through `puzzles`, the held-out conversations
   are answered about as often right as the trainer's own held-out evaluation found; through
   `yes`, every puzzle gets "yes". A bad body gets a 4xx and the server answers the next request.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from kubernetes import client

from e2e.conftest import CHART, KWOK_TOLERATION, Cluster, wait_for
from e2e.kserve import KServe
from e2e.operator.conftest import (
    ADAPTERS,
    HOLD,
    ISVC,
    Kubelet,
    Operator,
    Workspace,
    apply,
    condition,
    finetunejob,
    get,
    items,
    pod_annotations,
    running_pod,
    stage,
)

INIT = {"architecture": "llama", "hiddenSize": 64, "numLayers": 2, "numHeads": 4, "maxPositionEmbeddings": 256,
        "tokenizer": {"train": {"vocabSize": 512}}}
PRETRAIN = {"maxSteps": 200, "batchSize": 16, "maxLength": 64, "learningRate": 3e-3, "warmupRatio": 0.05,
            "lrSchedulerType": "cosine", "loggingSteps": 50, "saveSteps": 100000}
SFT = {"maxSteps": 600, "batchSize": 32, "maxLength": 64, "learningRate": 1e-2, "loggingSteps": 100,
       "saveSteps": 100000}
YES = {"maxSteps": 40, "batchSize": 16, "maxLength": 32, "learningRate": 1e-2, "loggingSteps": 20, "saveSteps": 100000}
LORA = {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
PUBLISH = {"gpus": 0}  # kubetune-serve on CPU: the operator picks runtime kubetune for gpus 0


@pytest.fixture(scope="module")
def kserve(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServe]:
    k = KServe(cluster, tmp_path_factory.mktemp("kserve"))
    k.start()
    runtime = subprocess.run(
        [str(cluster.bin_dir / "helm"), "template", "kt", str(CHART), "--namespace", "kubetune-system",
         "--api-versions", "serving.kserve.io/v1alpha1/ClusterServingRuntime",
         "--show-only", "templates/servingruntime.yaml",
         "--set-json", f"servingRuntime.tolerations={json.dumps([KWOK_TOLERATION])}"],
        check=True, capture_output=True, text=True, timeout=120).stdout
    try:
        cluster.kubectl("apply", "-f", "-", input=runtime)
        yield k
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "-f", "-", input=runtime, check=False)
        k.stop()


def run_stage(core: client.CoreV1Api, kubelet: Kubelet, ns: str, job: str, stage_name: str) -> None:
    """Run the stage's (one-node) pod to its end with the stand-in kubelet."""
    pod = f"{job}-{stage_name}-master-0"
    running_pod(core, ns, pod)
    kubelet.start(ns, pod, pod_ip="127.0.0.1")
    assert kubelet.wait(ns, pod, timeout=900) == 0, kubelet.log(ns, pod)[-3000:]


def served_pod(core: client.CoreV1Api, ns: str, isvc: str, adapters: list[str]) -> str | None:
    """The InferenceService's running predictor pod whose server has all `adapters`."""
    for pod in core.list_namespaced_pod(ns, label_selector=f"serving.kserve.io/inferenceservice={isvc}").items:
        args = pod.spec.containers[0].args or []
        if pod.status.phase == "Running" and not pod.metadata.deletion_timestamp and \
                all(any(a.startswith(f"--adapter={name}=") for a in args) for name in adapters):
            return str(pod.metadata.name)
    return None


def through_service(api: client.ApiClient, kubelet: Kubelet, ns: str, service: str) -> str:
    """The base URL a request to the Service reaches on this machine: the Service's port maps to a
    ready endpoint of its EndpointSlice (pod and target port), and that pod's port to the port its
    server has here."""
    svc = client.CoreV1Api(api).read_namespaced_service(service, ns)
    (port,) = svc.spec.ports
    slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        ns, label_selector=f"kubernetes.io/service-name={service}").items
    ready = [(e, p) for s in slices for e in s.endpoints or [] if e.conditions.ready
             for p in s.ports or [] if (p.name or "") == (port.name or "")]
    assert len(ready) == 1, f"Service {service} has {len(ready)} ready endpoints: {slices}"
    endpoint, target = ready[0]
    assert endpoint.target_ref.kind == "Pod"
    here = kubelet.container_ports[(ns, endpoint.target_ref.name, int(target.port))]
    print(f"\nService {service} {svc.spec.cluster_ip}:{port.port} -> pod {endpoint.target_ref.name} "
          f"{endpoint.addresses[0]}:{target.port} -> 127.0.0.1:{here} here")
    return f"http://127.0.0.1:{here}"


def chat(http: httpx.Client, model: str, messages: list[dict[str, Any]]) -> str:
    r = http.post("/openai/v1/chat/completions",
                  json={"model": model, "messages": messages, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model
    return str(body["choices"][0]["message"]["content"] or "")


def test_the_demo_pipeline_is_served_by_kserve_and_two_adapters_on_one_base_answer_as_themselves(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace,
    kubelet: Kubelet, kserve: KServe,
) -> None:
    from kubetune_trainer.data.synthetic import is_correct
    from kubetune_trainer.evals import split_conversation

    ns, root, core = workspace.namespace, workspace.pvc_root, client.CoreV1Api(admin_api)
    data = root / "data" / "tiny"
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(data)],
                   check=True, capture_output=True)
    held_out = [json.loads(line) for line in (data / "sft_messages" / "validation.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (data / "sft" / "train.jsonl").read_text().splitlines()]
    (data / "yes.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p}, {"role": "assistant", "content": "yes"}]}) + "\n" for p in prompts))

    cpu = {"nodes": 1, "gpusPerNode": 0}
    demo = finetunejob("demo", [
        stage("pretrain", "pretrain", None, None, resources=cpu, hyperparameters=PRETRAIN,
              dataset={"uri": "pvc://data/tiny/pretrain/train.jsonl", "format": "text",
                       "validationUri": "pvc://data/tiny/pretrain/validation.jsonl"}),
        stage("sft", "sft", None, None, resources=cpu, hyperparameters=SFT, tuning=LORA,
              dataset={"uri": "pvc://data/tiny/sft_messages/train.jsonl", "format": "messages",
                       "validationUri": "pvc://data/tiny/sft_messages/validation.jsonl"}),
    ], annotations=pod_annotations(HOLD), publish={**PUBLISH, "adapterName": "puzzles"})
    demo["spec"]["model"] = {"init": INIT}
    apply(cluster, demo, namespace=ns)
    run_stage(core, kubelet, ns, "demo", "pretrain")
    yes = finetunejob("yes", [stage("sft", "sft", "pvc://data/tiny/yes.jsonl", "messages", resources=cpu,
                                    hyperparameters=YES, tuning=LORA)],
                      annotations=pod_annotations(HOLD), publish={**PUBLISH, "adapterName": "yes"})
    yes["spec"]["model"] = {"uri": "pvc://models/demo/pretrain"}
    apply(cluster, yes, namespace=ns)
    for job in ("demo", "yes"):  # one after the other: a trainer pod's metrics port is the same in every pod
        run_stage(core, kubelet, ns, job, "sft")
    for job in ("demo", "yes"):
        cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, f"ftj/{job}", "--timeout=120s", timeout=150)
    trained = json.loads((root / "models" / "demo" / "sft" / "metrics.json").read_text())

    # One InferenceService for both adapters; KServe makes its Deployment and Service.
    adapters = {name: wait_for(f"ModelAdapter {name}", lambda n=name: get(admin_api, ADAPTERS, ns, n), timeout=60)
                for name in ("puzzles", "yes")}
    assert adapters["puzzles"]["spec"]["baseModelUri"] == adapters["yes"]["spec"]["baseModelUri"], adapters
    isvc = wait_for("one InferenceService serving both adapters", lambda: (
        found := [i for i in items(admin_api, ISVC, ns)
                  if sum(a.startswith("--adapter=") for a in i["spec"]["predictor"]["model"].get("args", [])) == 2])
        and found[0], timeout=60)
    name = isvc["metadata"]["name"]
    assert isvc["spec"]["predictor"]["model"]["runtime"] == "kubetune-serve"
    deployment = wait_for("KServe's Deployment", lambda: next(iter(client.AppsV1Api(admin_api).list_namespaced_deployment(
        ns, label_selector=f"serving.kserve.io/inferenceservice={name}").items), None), timeout=60)
    assert deployment.metadata.owner_references[0].kind == "InferenceService"
    pod = wait_for("the predictor pod with both adapters", lambda: served_pod(core, ns, name, ["puzzles", "yes"]),
                   timeout=120)
    mounts = {m.mount_path: m for m in core.read_namespaced_pod(pod, ns).spec.containers[0].volume_mounts}
    assert mounts["/mnt/models"].sub_path == "demo/pretrain"  # KServe's pod mutator mounted the storageUri
    kubelet.serve(ns, pod)

    ready = wait_for("KServe to mark the InferenceService Ready", lambda: (
        i := get(admin_api, ISVC, ns, name)) and condition(i, "Ready").get("status") == "True" and i, timeout=120)
    assert ready["status"].get("deploymentMode") == "RawDeployment"
    for adapter in ("puzzles", "yes"):
        status = wait_for(f"ModelAdapter {adapter} Ready", lambda a=adapter: (
            x := get(admin_api, ADAPTERS, ns, a)) and condition(x, "Ready").get("status") == "True" and x, timeout=60)
        assert (status["status"]["inferenceService"], status["status"].get("url")) == (name, ready["status"]["url"])

    # Requests through the Service KServe made.
    with httpx.Client(base_url=through_service(admin_api, kubelet, ns, f"{name}-predictor"), timeout=120) as http:
        listed = sorted(m["id"] for m in http.get("/openai/v1/models").json()["data"])
        assert {"puzzles", "yes"} <= set(listed), listed
        conversations = [c[0] for c in (split_conversation(row["messages"]) for row in held_out) if c]
        puzzles = [next(m["content"] for m in reversed(c) if m["role"] == "user") for c in conversations]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda c: chat(http, "puzzles", c), conversations))
        right = [i for i, (p, a) in enumerate(zip(puzzles, answers, strict=True)) if is_correct(p, a)]
        score, expected = len(right) / len(puzzles), trained["after"]["exactMatch"]
        noise = 2 * math.sqrt(max(expected * (1 - expected), 0.05) / len(puzzles))
        print(f"held-out exact match through the Service: {score:.3f} over {len(puzzles)} conversations "
              f"(the trainer's held-out evaluation: {expected:.3f}); e.g. {puzzles[right[0]]!r} -> {answers[right[0]]!r}"
              if right else f"no held-out puzzle answered right: {list(zip(puzzles, answers))[:5]}")
        assert len(right) >= 10 and score >= expected - noise

        said = [chat(http, "yes", [{"role": "user", "content": p}]).strip() for p in puzzles[:20]]
        assert said == ["yes"] * 20, said
        assert "yes" not in {a.strip() for a in answers}  # each adapter answers as itself on the shared base

        bad = http.post("/openai/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert 400 <= bad.status_code < 500 and bad.text, bad.text
        assert chat(http, "yes", [{"role": "user", "content": puzzles[0]}]).strip() == "yes"
