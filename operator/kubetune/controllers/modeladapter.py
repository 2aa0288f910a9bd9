"""ModelAdapter controller: serve a trained model through a KServe InferenceService (or an
LLMInferenceService, `spec.serving.api: llmInferenceService`).

A merged model gets its own InferenceService; LoRA adapters on one base model share one
(publish/kserve.py), which every adapter it serves owns, and which is re-rendered from the
adapters left whenever one comes, changes or goes. Status mirrors the InferenceService's
Ready condition and URL. LLMInferenceServices go the same way.

The service's events are the fast path; a timer re-reads the service of every adapter that waits
for it to be Ready every RESYNC_SECONDS, as a controller's resync period would. kopf watches a resource
only if the API server's discovery lists it when kopf looks, and it looks again only when a
CRD changes: KServe's CRDs installed while the operator runs can be looked up a moment before
the API server serves them, and then their events never come.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client

from kubetune import metrics
from kubetune.api import reasons as r
from kubetune.api.meta import find_condition, set_condition
from kubetune.api.modeladapter import ModelAdapter
from kubetune.backends import LABEL_MANAGED_BY, MANAGED_BY
from kubetune.controllers import common
from kubetune.controllers.common import MODELADAPTERS, RUNTIME
from kubetune.publish import kserve

log = logging.getLogger("kubetune.operator")
INFERENCESERVICES = kserve.APIS["inferenceService"].resource
LLMINFERENCESERVICES = kserve.APIS["llmInferenceService"].resource
RETRY_SECONDS = 60.0
RESYNC_SECONDS = 30.0


@kopf.on.resume(*MODELADAPTERS)
@kopf.on.create(*MODELADAPTERS)
@kopf.on.update(*MODELADAPTERS)
def on_modeladapter(name: str, namespace: str | None, **_: Any) -> None:
    reconcile(namespace or "", name)


@kopf.on.event(*INFERENCESERVICES, labels={LABEL_MANAGED_BY: MANAGED_BY})
@kopf.on.event(*LLMINFERENCESERVICES, labels={LABEL_MANAGED_BY: MANAGED_BY})
def on_inferenceservice(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    """The (LLM)InferenceService changed: mirror its readiness into the adapters it serves."""
    if not namespace:
        return
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "ModelAdapter":
            common.quietly(lambda: reconcile(namespace, ref["name"], apply=False, trigger="child"))


def _waiting_for_service(status: Mapping[str, Any], **_: Any) -> bool:
    """The service exists and is not Ready yet (other reasons have their own retries)."""
    ready = find_condition(status.get("conditions"), r.READY)
    return ready is not None and ready.get("reason") == r.INFERENCE_SERVICE_NOT_READY


@kopf.timer(*MODELADAPTERS, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS, when=_waiting_for_service)
def resync_modeladapter(name: str, namespace: str | None, **_: Any) -> None:
    """Mirror the service's readiness even when its events were missed (see the module's note)."""
    common.quietly(lambda: reconcile(namespace or "", name, apply=False, trigger="timer"))


@kopf.on.delete(*MODELADAPTERS)
def on_modeladapter_deleted(name: str, namespace: str | None, body: kopf.Body, **_: Any) -> None:
    """Take the adapter out of its shared InferenceService (or delete the service it had alone)."""
    namespace = namespace or ""
    adapter = _model(dict(body))
    service, api = kserve.service_name(adapter), kserve.serving_api(adapter)
    with common.locked(api.kind, namespace, service):
        others = [a for a in _members(namespace, adapter) if a[0].metadata.name != name]
        if others:
            _apply(namespace, service, others)
        else:
            group, version, plural = api.resource
            try:
                common.custom().delete_namespaced_custom_object(group, version, namespace, plural, service)
                log.info("Deleted %s name=%s namespace=%s", api.kind, service, namespace)
            except client.ApiException as e:
                if e.status != 404:
                    raise
    common.forget("ModelAdapter", namespace, name)


def reconcile(namespace: str, name: str, apply: bool = True, trigger: str = "change") -> None:
    with common.locked("ModelAdapter", namespace, name), metrics.reconciling("ModelAdapter", trigger):
        body = common.get_custom(MODELADAPTERS, namespace, name)
        if body is not None and not body["metadata"].get("deletionTimestamp"):
            _reconcile(body, apply)


def _reconcile(body: dict[str, Any], apply: bool) -> None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    namespace, generation = meta["namespace"], meta.get("generation")
    conditions = list(status.get("conditions") or [])
    adapter = _model(body)
    unsupported = kserve.unsupported_uri(adapter)
    if unsupported:
        _write(body, status, {"observedGeneration": generation, "conditions": set_condition(
            conditions, r.READY, "False", r.UNSUPPORTED_URI, unsupported, generation)})
        raise kopf.PermanentError(unsupported)
    service, api = kserve.service_name(adapter), kserve.serving_api(adapter)
    if apply:
        with common.locked(api.kind, namespace, service):
            try:
                isvc = _apply(namespace, service, _members(namespace, adapter, body))
            except client.ApiException as e:
                if e.status != 404:
                    raise
                needs = " (KServe 0.16 or later)" if api.kind == kserve.LLM_KIND else ""
                message = f"The cluster has no {kserve.GROUP}/{api.version} {api.kind} API; install KServe{needs}."
                _write(body, status, {"observedGeneration": generation, "conditions": set_condition(
                    conditions, r.READY, "False", r.KSERVE_MISSING, message, generation)})
                raise kopf.TemporaryError(message, delay=RETRY_SECONDS) from None
    else:
        isvc = common.get_custom(api.resource, namespace, service) or {}
    ready, message, url = kserve.observe(isvc)
    reason = r.INFERENCE_SERVICE_READY if ready else r.INFERENCE_SERVICE_NOT_READY
    new: dict[str, Any] = {
        "observedGeneration": generation,
        "inferenceService": service,
        "modelName": kserve.served_name(adapter),
        "conditions": set_condition(conditions, r.READY, "True" if ready else "False", reason,
                                    f"{api.kind} {service}: {message}" if message else f"{api.kind} {service}.",
                                    generation),
    }
    if url:
        new["url"] = url
    _write(body, status, new)


def _model(body: dict[str, Any]) -> ModelAdapter:
    return ModelAdapter.model_validate({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})


def _members(namespace: str, adapter: ModelAdapter, body: dict[str, Any] | None = None) -> list[tuple[ModelAdapter, dict[str, Any]]]:
    """The adapters the InferenceService of `adapter` serves (itself alone unless shared)."""
    if not kserve.is_shared(adapter):
        return [(adapter, body or {})] if body else []
    out = []
    for other in common.list_custom(MODELADAPTERS, namespace):
        if other["metadata"].get("deletionTimestamp"):
            continue
        model = _model(other)
        if (kserve.is_shared(model) and model.spec.base_model_uri == adapter.spec.base_model_uri
                and model.spec.serving.runtime == adapter.spec.serving.runtime
                and model.spec.serving.api == adapter.spec.serving.api):
            out.append((model, other))
    return out


def _apply(namespace: str, service: str, members: list[tuple[ModelAdapter, dict[str, Any]]]) -> dict[str, Any]:
    """Create or update (LLM)InferenceService `service` to serve `members`; the stored object."""
    api = kserve.serving_api(members[0][0])
    desired = kserve.render_for(service, namespace, [m for m, _ in members], RUNTIME.settings.storage_secret)
    shared = len(members) > 1 or kserve.is_shared(members[0][0])
    for _, owner in members:
        kopf.append_owner_reference(desired, owner=common.kopf_body(owner), controller=not shared, block_owner_deletion=False)
    existing, created = common.create_custom(api.resource, namespace, desired)
    if created:
        metrics.INFERENCESERVICES_APPLIED.labels("created").inc()
        log.info("Created %s name=%s namespace=%s adapters=%s", api.kind, service, namespace,
                 ",".join(m.metadata.name for m, _ in members))
        for _, owner in members:
            common.event(owner, r.EVENT_CREATED, f"Created {api.kind} {service}.")
        return existing
    meta = existing["metadata"]
    if (existing.get("spec") == desired["spec"] and meta.get("ownerReferences") == desired["metadata"]["ownerReferences"]
            and all(meta.get("labels", {}).get(k) == v for k, v in desired["metadata"]["labels"].items())):
        return existing
    existing["spec"] = desired["spec"]
    meta["ownerReferences"] = desired["metadata"]["ownerReferences"]
    meta["labels"] = {**(meta.get("labels") or {}), **desired["metadata"]["labels"]}
    group, version, plural = api.resource
    stored = common.custom().replace_namespaced_custom_object(group, version, namespace, plural, service, existing)
    metrics.INFERENCESERVICES_APPLIED.labels("updated").inc()
    log.info("Updated %s name=%s namespace=%s adapters=%s", api.kind, service, namespace,
             ",".join(m.metadata.name for m, _ in members))
    return stored


def _write(body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
    if common.changed(old, new):
        common.patch_status(MODELADAPTERS, body, new)
