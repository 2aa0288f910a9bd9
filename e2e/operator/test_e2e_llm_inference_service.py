"""`serving.api: llmInferenceService` against KServe's real LLMInferenceService CRD (from KServe's
Go module, the first release that has it): what the operator renders is accepted by the API
server as it is (nothing pruned), a wrong object is refused, and the operator, under the Helm
chart's RBAC, creates one for a ModelAdapter and mirrors its readiness.

    .venv/bin/python -m pytest e2e/operator/test_e2e_llm_inference_service.py

No KServe controller runs here: the test writes the status KServe's controller would.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.conftest import Cluster, llm_inference_service_crd, wait_for
from e2e.operator.conftest import ADAPTERS, Operator, apply, condition, get, mark_ready
from kubetune.api.modeladapter import ModelAdapter
from kubetune.publish import kserve

LLMISVC = kserve.APIS["llmInferenceService"].resource
BASE = "hf://Qwen/Qwen2.5-0.5B"


@pytest.fixture(scope="module")
def llm_crd(cluster: Cluster, operator_crds: None) -> None:
    cluster.apply_crds(llm_inference_service_crd())


def spec(**spec: Any) -> dict[str, Any]:
    return {**spec, "serving": {"api": "llmInferenceService", **spec.get("serving", {})}}


def adapter(name: str, **fields: Any) -> ModelAdapter:
    return ModelAdapter.model_validate({"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter",
                                        "metadata": {"name": name, "namespace": "ns"}, "spec": spec(**fields)})


def dry_run(cluster: Cluster, namespace: str, obj: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-o", "yaml",
                           "-f", "-", input=yaml.safe_dump(obj), check=check)


def test_the_llminferenceservice_crd_accepts_what_the_operator_renders(
    cluster: Cluster, llm_crd: None, namespace: str,
) -> None:
    merged = adapter("bot", mergedUri="pvc://models/bot/sft", servedModelName="support-bot", serving={"gpus": 2})
    support = adapter("support", baseModelUri=BASE, adapterUri="pvc://models/support/sft")
    sales = adapter("sales", baseModelUri=BASE, adapterUri="s3://bucket/sales/dpo", serving={"replicas": 2})

    for members in ([merged], [support, sales]):
        rendered = kserve.render_for(kserve.service_name(members[0]), namespace, members)
        stored = yaml.safe_load(dry_run(cluster, namespace, rendered).stdout)
        assert stored["kind"] == "LLMInferenceService"
        assert stored["spec"] == rendered["spec"]  # nothing pruned or defaulted away by the schema
    assert [a["name"] for a in stored["spec"]["model"]["lora"]["adapters"]] == ["sales", "support"]

    wrong = kserve.render_for(kserve.service_name(merged), namespace, [merged])
    wrong["spec"]["model"] = {"storageUri": "pvc://models/bot/sft"}  # the InferenceService's field, not uri
    wrong["spec"]["replicas"] = -1
    proc = dry_run(cluster, namespace, wrong, check=False)
    assert proc.returncode != 0
    assert 'unknown field "spec.model.storageUri"' in proc.stderr, proc.stderr


def test_the_operator_serves_a_model_adapter_through_an_llminferenceservice(
    cluster: Cluster, admin_api: client.ApiClient, llm_crd: None, running_operator: Operator, namespace: str,
) -> None:
    apply(cluster, {"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter", "metadata": {"name": "llm-bot"},
                    "spec": spec(mergedUri="pvc://models/bot/sft", servedModelName="support-bot")},
          namespace=namespace)

    llmisvc = wait_for("the LLMInferenceService", lambda: get(admin_api, LLMISVC, namespace, "llm-bot"), timeout=60)
    assert llmisvc["spec"]["model"] == {"uri": "pvc://models/bot/sft", "name": "support-bot"}
    assert llmisvc["metadata"]["ownerReferences"][0]["name"] == "llm-bot"
    wait_for("the adapter's status", lambda: (a := get(admin_api, ADAPTERS, namespace, "llm-bot"))
             and condition(a, "Ready").get("reason") == "InferenceServiceNotReady" and a, timeout=30)

    ready = mark_ready(admin_api, LLMISVC, namespace, "llm-bot")
    assert ready["status"]["inferenceService"] == "llm-bot"
    assert condition(ready, "Ready")["message"].startswith("LLMInferenceService llm-bot")

    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", check=False, input=yaml.safe_dump(
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter", "metadata": {"name": "llm-kt"},
         "spec": spec(mergedUri="pvc://models/kt", serving={"runtime": "kubetune"})}))
    assert proc.returncode != 0 and "spec.serving.api" in proc.stderr, proc.stderr
