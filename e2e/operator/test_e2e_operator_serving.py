"""ModelAdapters rendered into KServe InferenceServices that KServe's real CRD accepts.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_serving.py

These tests run without KServe's controller: where one needs an InferenceService to become
Ready, it writes the status KServe's controller would (Ready=True and a URL). The controller
itself runs in test_e2e_operator_kserve.py (e2e/kserve.py), which takes over every
InferenceService while it runs.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client

from e2e.conftest import Cluster, wait_for
from e2e.operator.conftest import ADAPTERS, ISVC, Operator, apply, condition, get, items, mark_ready

BASE = "hf://Qwen/Qwen2.5-0.5B"


def model_adapter(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter", "metadata": {"name": name}, "spec": spec}


def test_a_merged_model_is_served_by_its_own_inferenceservice_and_mirrors_its_readiness(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    apply(cluster, model_adapter("bot", mergedUri="pvc://models/bot/sft", servedModelName="support-bot"),
          namespace=namespace)

    isvc = wait_for("the InferenceService", lambda: get(admin_api, ISVC, namespace, "bot"), timeout=60)
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["storageUri"] == "pvc://models/bot/sft"
    assert model["args"] == ["--model_name=support-bot", "--backend=vllm"]
    assert isvc["metadata"]["ownerReferences"][0]["name"] == "bot"
    adapter = wait_for("the adapter's status", lambda: (a := get(admin_api, ADAPTERS, namespace, "bot"))
                       and condition(a, "Ready").get("reason") == "InferenceServiceNotReady" and a, timeout=30)
    assert (adapter["status"]["inferenceService"], adapter["status"]["modelName"]) == ("bot", "support-bot")

    adapter = mark_ready(admin_api, ISVC, namespace, "bot")
    assert condition(adapter, "Ready")["reason"] == "InferenceServiceReady"


def _shared(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    return [i for i in items(api, ISVC, namespace) if "kubetune.io/base-model" in i["metadata"].get("labels", {})]


def _modules(isvc: dict[str, Any]) -> list[str]:
    args = isvc["spec"]["predictor"]["model"]["args"]
    return args[args.index("--lora-modules") + 1:]


def test_two_adapters_on_one_base_model_share_one_inferenceservice(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    apply(cluster, model_adapter("support", baseModelUri=BASE, adapterUri="pvc://models/support/sft"),
          model_adapter("sales", baseModelUri=BASE, adapterUri="pvc://models/sales/dpo"), namespace=namespace)

    (isvc,) = wait_for("one InferenceService serving both", lambda: (s := _shared(admin_api, namespace))
                       and len(s) == 1 and len(_modules(s[0])) == 2 and s, timeout=60)
    assert _modules(isvc) == ["sales=/mnt/pvc/models/sales/dpo", "support=/mnt/pvc/models/support/sft"]
    assert "--enable-lora" in isvc["spec"]["predictor"]["model"]["args"]
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == BASE
    assert isvc["spec"]["predictor"]["volumes"] == [
        {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}]
    assert sorted(r["name"] for r in isvc["metadata"]["ownerReferences"]) == ["sales", "support"]
    name = isvc["metadata"]["name"]
    for adapter in ("support", "sales"):
        a = wait_for(f"{adapter}'s status", lambda: (x := get(admin_api, ADAPTERS, namespace, adapter))
                     and (x.get("status") or {}).get("inferenceService") and x, timeout=30)
        assert a["status"]["inferenceService"] == name

    cluster.kubectl("delete", "modeladapter", "sales", "-n", namespace, "--timeout=60s")

    (isvc,) = wait_for("the server to drop sales", lambda: (s := _shared(admin_api, namespace))
                       and _modules(s[0]) == ["support=/mnt/pvc/models/support/sft"] and s, timeout=60)
    assert [r["name"] for r in isvc["metadata"]["ownerReferences"]] == ["support"]

    cluster.kubectl("delete", "modeladapter", "support", "-n", namespace, "--timeout=60s")

    wait_for("the shared server to go", lambda: get(admin_api, ISVC, namespace, name) is None, timeout=60)
