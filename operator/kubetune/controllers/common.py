"""What every controller shares: the API client, per-object locks, child creation, status writes.

Handlers are synchronous (kopf runs them in its thread pool) and call one `reconcile` per
object; the few that fire far more often than they find work (a child's status bookkeeping, a
timer's tick) are async, decide in the event loop, and hand the reconcile to a pool (`in_pool`).
Several triggers can fire for one object at once (its own change, a child's event, a timer),
so each reconcile holds a per-object lock and reads the object fresh; children have
deterministic names, so a retry after a crash finds what it created (409 -> reuse).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from kubernetes import client

from kubetune import apiclient
from kubetune.api.meta import GROUP, VERSION
from kubetune.backends import BackendSettings

log = logging.getLogger("kubetune.operator")

FINETUNEJOBS = (GROUP, VERSION, "finetunejobs")
PREFERENCEDATASETS = (GROUP, VERSION, "preferencedatasets")
MODELADAPTERS = (GROUP, VERSION, "modeladapters")


@dataclass
class Runtime:
    """The operator's process-wide state, set once by `kubetune.operator` before kopf starts."""

    api: client.ApiClient | None = None
    settings: BackendSettings = field(default_factory=BackendSettings)
    scrape_trainer: bool = True  # read the trainer's metrics endpoint for progress
    handlers: Executor | None = None  # kopf's pool of the handlers' threads (set at startup)
    background: Executor | None = None  # the timers' reconciles (`background_pool`)


BACKGROUND_WORKERS = 2


RUNTIME = Runtime()


def api() -> client.ApiClient:
    if RUNTIME.api is None:
        from kubernetes import config

        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        RUNTIME.api = apiclient.ApiClient()
    return RUNTIME.api


def requests() -> apiclient.Requests:
    """The handlers' requests (custom resources, core/v1, batch/v1), answered as wire dicts."""
    return apiclient.Requests(api())


custom = core = batch = requests  # the kubernetes client's API each call's method is named after


# --- locks --------------------------------------------------------------------------------

_locks: dict[tuple[str, str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def locked(kind: str, namespace: str, name: str) -> Iterator[None]:
    """Hold the lock of one object, so its reconciles in this process never overlap."""
    with _locks_guard:
        lock = _locks.setdefault((kind, namespace, name), threading.Lock())
    with lock:
        yield


def forget(kind: str, namespace: str, name: str) -> None:
    with _locks_guard:
        _locks.pop((kind, namespace, name), None)


# --- reading and writing ------------------------------------------------------------------


def get_custom(resource: tuple[str, str, str], namespace: str, name: str) -> dict[str, Any] | None:
    group, version, plural = resource
    try:
        return custom().get_namespaced_custom_object(group, version, namespace, plural, name)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def list_custom(resource: tuple[str, str, str], namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
    group, version, plural = resource
    rsp = custom().list_namespaced_custom_object(group, version, namespace, plural, label_selector=selector)
    return cast(list[dict[str, Any]], rsp.get("items") or [])


def create_custom(resource: tuple[str, str, str], namespace: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create `body`, or read the object of that name if it exists: (object, created)."""
    group, version, plural = resource
    try:
        return custom().create_namespaced_custom_object(group, version, namespace, plural, body), True
    except client.ApiException as e:
        if e.status != 409:
            raise
    existing = get_custom(resource, namespace, body["metadata"]["name"])
    if existing is None:
        raise kopf.TemporaryError(f"{body['kind']} {body['metadata']['name']} exists and vanished; retrying", delay=1)
    return existing, False


def create_core(kind: str, namespace: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create a ConfigMap or a Job, or read the existing one of that name: (object, created)."""
    name = body["metadata"]["name"]
    try:
        if kind == "ConfigMap":
            return core().create_namespaced_config_map(namespace, body), True
        return batch().create_namespaced_job(namespace, body), True
    except client.ApiException as e:
        if e.status != 409:
            raise
    if kind == "ConfigMap":
        return core().read_namespaced_config_map(name, namespace), False
    return batch().read_namespaced_job(name, namespace), False


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    """Whether `obj` names `owner` (by uid) among its owner references."""
    uid = owner["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def patch_status(resource: tuple[str, str, str], body: dict[str, Any], status: dict[str, Any]) -> None:
    """Merge-patch `status` (whole lists: conditions and stages are always written entire) onto the
    object as `body` read it: the patch carries body's resourceVersion, so a write based on a stale
    read (another replica's during a peering hand-over, or a change meanwhile) is refused and the
    reconcile runs again on a fresh read instead of the last writer winning. Body's resourceVersion
    moves on to the written object's, for the next write of the same reconcile."""
    group, version, plural = resource
    meta = body["metadata"]
    patch: dict[str, Any] = {"status": status}
    if meta.get("resourceVersion"):
        patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}
    try:
        written = custom().patch_namespaced_custom_object_status(group, version, meta["namespace"], plural, meta["name"],
                                                                 patch)
    except client.ApiException as e:
        if e.status == 404:  # deleted meanwhile: nothing to report on
            return
        if e.status == 409:
            raise kopf.TemporaryError(f"{meta['name']} changed since it was read; reconciling again", delay=1) from None
        raise
    meta["resourceVersion"] = written["metadata"]["resourceVersion"]


def changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


def event(body: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
    """Post a Kubernetes Event about `body` (kopf sends it in the background)."""
    try:
        kopf.event(kopf_body(body), type="Warning" if warning else "Normal", reason=reason, message=message)
    except LookupError:  # outside kopf's context (unit tests): log only
        pass
    meta = body.get("metadata", {})
    log.log(logging.WARNING if warning else logging.INFO, "Posted Event reason=%s %s=%s/%s message=%r", reason,
            str(body.get("kind", "")).lower(), meta.get("namespace"), meta.get("name"), message)


def kopf_body(body: dict[str, Any]) -> kopf.Body:
    """A plain wire dict as the kopf.Body kopf's helpers (adopt, event) take."""
    return kopf.Body(cast(kopf.RawBody, body))


def true_conditions(conditions: list[dict[str, Any]]) -> set[str]:
    return {c["type"] for c in conditions if c.get("status") == "True"}


def owner_name(body: dict[str, Any], kind: str) -> str | None:
    """Name of the owner of `kind` in an object's ownerReferences."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == kind:
            return cast(str, ref.get("name"))
    return None


def background_pool() -> Executor:
    """The pool of the timers' reads and reconciles, apart from kopf's pool of the handlers: a
    thousand jobs that wait for their pods cannot queue a stage hand-off (a child's event) behind
    their periodic lookups of why."""
    if RUNTIME.background is None:
        RUNTIME.background = ThreadPoolExecutor(BACKGROUND_WORKERS, thread_name_prefix="kubetune-timer")
    return RUNTIME.background


async def in_pool(pool: Executor | None, fn: Callable[[], Any]) -> Any:
    """Run `fn` in a thread of `pool` (None: the handlers' pool), in a copy of this task's context,
    as kopf runs a synchronous handler."""
    call = functools.partial(contextvars.copy_context().run, fn)
    future = asyncio.get_running_loop().run_in_executor(pool or RUNTIME.handlers, call)
    cancelled: asyncio.CancelledError | None = None
    while not future.done():  # a cancelled task waits for its thread, which cannot be stopped
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as e:
            cancelled = e
    if cancelled is not None:
        raise cancelled
    return future.result()


def api_error(e: client.ApiException) -> str:
    """An API server's refusal on one line: its code, reason and the message of its Status body."""
    try:
        message = json.loads(e.body or "{}").get("message") or ""
    except (ValueError, AttributeError):
        message = str(e.body or "")
    return f"({e.status} {e.reason}) {message}".strip()


def quietly(fn: Any, *args: Any) -> None:
    """Run a reconcile from a watch event: its retries and refusals are the object's own handlers' business."""
    try:
        fn(*args)
    except (kopf.TemporaryError, kopf.PermanentError) as e:
        log.debug("Deferred reconcile: %s", e)
