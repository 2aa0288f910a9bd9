"""FineTuneJob controller: each stage a PyTorchJob, chained by their conditions.

The whole life of a job, in `reconcile`:
1. check the spec beyond the CRD (a bad one: Accepted=False, Failed=True, nothing created);
2. observe the stages' PyTorchJobs (deterministic names `<job>-<stage>`);
3. act on the first stage not done: start it (StageRun ConfigMap + PyTorchJob, once), keep its
   suspension in line with spec.runPolicy.suspend, or stop when it failed;
4. write the whole status (conditions, stages, progress) and post an Event per transition;
5. when every stage succeeded, publish a ModelAdapter if spec.publish asks for one.
Triggers: the job's own changes, its PyTorchJobs' and PreferenceDatasets' watch events, and a
timer (registered by kubetune.operator) that also reads the running trainer's progress: one
loop over an index of the unfinished jobs, not a kopf timer per job (`register_timer` says why).
Deletion removes the children.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import kopf
from kubernetes import client

from kubetune import metrics
from kubetune.api import reasons as r
from kubetune.api import registry
from kubetune.api.finetunejob import FineTuneJob, FineTuneJobStatus
from kubetune.api.meta import API_VERSION, find_condition, is_true, now_rfc3339
from kubetune.api.preferencedataset import FORMAT_BY_SCHEMA, PreferenceDataset
from kubetune.api.stagerun import StageData, render_stage_run, stage_output_uri
from kubetune.backends import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY, child_name, label_value
from kubetune.backends import kueue
from kubetune.backends import pytorchjob as backend
from kubetune.backends import trainer_metrics
from kubetune.controllers import common
from kubetune.controllers.common import FINETUNEJOBS, MODELADAPTERS, PREFERENCEDATASETS, RUNTIME, api_error
from kubetune.controllers.pipeline import (
    Phase,
    Plan,
    adapter_spec,
    check,
    failure_detail,
    job_conditions,
    observe_stages,
    progress,
    publish_runtime,
    note_master_pod,
    restarted_at,
    seconds_between,
)

log = logging.getLogger("kubetune.operator")
PYTORCHJOBS = (backend.GROUP, backend.VERSION, backend.PLURAL)
POLL_SECONDS = 10.0  # the timer: trainer progress, why pods wait, and a safety net for missed watch events
WAIT_SECONDS = 10.0  # retry delay while a stage waits for its PreferenceDataset


@kopf.on.resume(*FINETUNEJOBS)
@kopf.on.create(*FINETUNEJOBS)
@kopf.on.update(*FINETUNEJOBS)
def on_finetunejob(name: str, namespace: str | None, body: kopf.Body, **kwargs: Any) -> None:
    """The job's own change (or the operator's start): reconciled from the body kopf just received,
    not a fresh read. kopf calls these handlers once the watch has brought its own last patch, so
    the body is as new as the watch; if anything wrote the job since, the status write (which
    carries the body's resourceVersion) is refused and kopf runs the handler again on the newer body."""
    reconcile(namespace or "", name, children=kwargs.get(CHILDREN), received=copy.deepcopy(dict(body)))


def _unfinished(status: Mapping[str, Any], **_: Any) -> bool:
    conditions = list(status.get("conditions") or [])
    return not (is_true(conditions, r.SUCCEEDED) or is_true(conditions, r.FAILED))


async def poll_finetunejob(name: str, namespace: str | None, uid: str, status: Mapping[str, Any],
                           **kwargs: Any) -> None:
    """One tick of the timer on one unfinished job (see `register_timer`): progress, and why pods
    wait. Whether a tick has anything to do is decided here, in the event loop; the reads and the
    reconcile run in the background pool (common.background_pool), never in the handlers' threads."""
    namespace = namespace or ""
    children = kwargs.get(CHILDREN)
    if not _due(namespace, name, uid, status, children, progress=True):
        return
    await common.in_pool(common.background_pool(), lambda: poll(namespace, name, uid, status, children))


def poll(namespace: str, name: str, uid: str, status: Mapping[str, Any],
         children: kopf.Index[tuple[str, str], dict[str, Any]] | None = None) -> None:
    """The timer's work on one job: the trainer's metrics endpoint (up to a second) is read before
    taking the job's lock, so a slow trainer never holds up the job's other reconciles."""
    scraped = scrape_running_stage(namespace, status) if RUNTIME.scrape_trainer else None
    if scraped is None and not _due(namespace, name, uid, status, children, progress=False):
        return  # no progress read after all (no pod IP yet, an endpoint that did not answer)
    common.quietly(lambda: reconcile(namespace, name, scrape=True, scraped=scraped, children=children,
                                     trigger="timer"))


def _due(namespace: str, name: str, uid: str, status: Mapping[str, Any],
         children: kopf.Index[tuple[str, str], dict[str, Any]] | None, *, progress: bool) -> bool:
    """Whether a tick has something to read. Never for a job no reconcile wrote a status to yet
    (its create or resume handler is queued: a tick would do the same work twice, in a burst of
    new jobs for most of them). Always when a stage runs and its trainer's progress is read
    (`progress`: that counts), or when no stage runs or waits for its pods (one to start, a data
    set to wait for).
    A stage that runs or waits for its pods is left to its PyTorchJob's events, and looked at (why
    its pods wait) only when nothing reconciled the job for SAFETY_NET_TICKS ticks, and then not
    while the training-operator has not taken its PyTorchJob up (no condition yet: its first
    status is an event that wakes the job, and until then no pod or Event can say more). The wait
    doubles with each such look that nothing else followed (`_quiet`), up to 2**SAFETY_NET_DOUBLINGS
    times, as controller-runtime's requeues back off: a thousand jobs queued at a busy
    training-operator otherwise asked every minute why their pods wait (2.4 looks per job at
    N = 1,000, each a read of the job, its pods and its Events), slowing the API server they share
    with the training-operator."""
    if not status.get("conditions"):
        return False
    stages = status.get("stages") or []
    if progress and RUNTIME.scrape_trainer and RUNTIME.settings.trainer_metrics_port \
            and any(s.get("jobName") and s.get("state") == "Running" for s in stages):
        return True
    waiting = [s["jobName"] for s in stages if s.get("jobName") and s.get("state") in ("Running", "Pending")]
    last = _reconciled.get((namespace, name))
    if not waiting or last is None:
        return True
    if time.monotonic() - last < _safety_net * 2 ** min(_quiet.get((namespace, name), 0), SAFETY_NET_DOUBLINGS):
        return False
    indexed = {pj["metadata"]["name"]: pj for pj in _indexed(children, (namespace, uid)) or []}
    return any(n not in indexed or (indexed[n].get("status") or {}).get("conditions") for n in waiting)


def register_timer(interval: float = POLL_SECONDS, *, peering: bool = True) -> None:
    """Tick every unfinished job every `interval` seconds (`kubetune operator --progress-interval`)
    with `poll_finetunejob`, from one loop the operator starts (`poll_forever`).
    Not a kopf timer per job: kopf keeps the whole latest body of every object of a kind that has
    one (for the timer's arguments), finished jobs too, about 30 KB of Python objects per
    FineTuneJob (managedFields, kopf's annotations, the status), and a task per unfinished job; the
    loop reads a slim index of the unfinished jobs instead (`unfinished_finetunejobs`).
    A job whose stage runs with no new progress, or waits for its pods, is reconciled by the timer
    only when nothing else reconciled it for SAFETY_NET_TICKS ticks: a thousand jobs waiting for
    the training-operator would otherwise keep the workers and the rate limit busy with lookups of
    why their pods wait, and the hand-offs would queue behind them.
    `peering`: replicas coordinate through kopf peering, so the loop pauses when kopf pauses this
    replica, as kopf's timers do (`kopf_pause`)."""
    global _safety_net
    _safety_net = SAFETY_NET_TICKS * interval
    loop: dict[str, asyncio.Task[None]] = {}

    async def start(**kwargs: Any) -> None:
        paused = kopf_pause()
        if peering and paused is None:
            raise kopf.PermanentError(
                "kopf's pause state (peering) was not found in this version of kopf, so the FineTuneJob timer could "
                "not pause with the operator; run with --standalone (one replica), or a kopf version kubetune supports")
        loop["task"] = asyncio.create_task(poll_forever(interval, kwargs[UNFINISHED], kwargs[CHILDREN], paused),
                                           name="kubetune FineTuneJob timer")

    async def stop(**_: Any) -> None:
        if task := loop.pop("task", None):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    kopf.on.startup(id="finetunejob-timer")(start)
    kopf.on.cleanup(id="finetunejob-timer")(stop)


@kopf.index(*FINETUNEJOBS, when=_unfinished)
def unfinished_finetunejobs(name: str, namespace: str | None, uid: str, status: Mapping[str, Any],
                            **_: Any) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """What the timer reads of each unfinished job: (namespace, name) -> (uid, its status less all
    but what `_due` and the trainer's scrape read: the conditions' types and statuses, the stages'
    states and PyTorchJobs). kopf keeps it from the FineTuneJob watch and drops a job once it
    finished or was deleted."""
    slim = {"conditions": [{"type": c.get("type"), "status": c.get("status")} for c in status.get("conditions") or []],
            "stages": [{k: st[k] for k in ("name", "state", "jobName") if k in st} for st in status.get("stages") or []]}
    return {(namespace or "", name): (uid, slim)}


UNFINISHED = "unfinished_finetunejobs"  # kopf passes each index to every handler by its function's name


async def poll_forever(interval: float, jobs: kopf.Index[tuple[str, str], tuple[str, dict[str, Any]]],
                       children: kopf.Index[tuple[str, str], dict[str, Any]] | None, paused: Any) -> None:
    """Every `interval` seconds, a tick (`poll_finetunejob`) for every unfinished job that has
    something to read (`_due`, decided here in the event loop) and no tick of its own still running.
    At most 2 x BACKGROUND_WORKERS ticks wait for the pool at once; the sweep waits for a free
    place. `paused`: kopf's pause state of the operator (None: never paused), waited out."""
    running: set[tuple[str, str]] = set()
    places = asyncio.Semaphore(2 * common.BACKGROUND_WORKERS)
    tasks: set[asyncio.Task[None]] = set()

    async def one(key: tuple[str, str], uid: str, status: dict[str, Any]) -> None:
        try:
            # poll_finetunejob asks `_due` again: a reconcile while the tick waited for a place makes it moot
            await poll_finetunejob(name=key[1], namespace=key[0], uid=uid, status=status, **{CHILDREN: children})
        except client.ApiException as e:  # a tick's failure is the next tick's business; the loop goes on
            log.warning("FineTuneJob timer tick failed, will retry at the next tick: finetunejob=%s/%s %s", *key,
                        api_error(e))
        except Exception:
            log.exception("FineTuneJob timer tick failed, will retry at the next tick: finetunejob=%s/%s", *key)
        finally:
            running.discard(key)
            places.release()

    try:
        while True:
            await asyncio.sleep(interval)
            if paused is not None and paused.is_on():
                await paused.wait_for(False)
                continue
            snapshot = [(key, next(iter(values))) for key, values in list(jobs.items()) if len(values) == 1]
            for (namespace, name), (uid, status) in snapshot:
                if (namespace, name) in running or not _due(namespace, name, uid, status, children, progress=True):
                    continue
                await places.acquire()
                if paused is not None and paused.is_on():
                    places.release()
                    break
                running.add((namespace, name))
                task = asyncio.create_task(one((namespace, name), uid, status))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()


def kopf_pause() -> Any:
    """kopf's pause state of this operator (a ToggleSet, on while peering says another replica
    acts), or None where it is not found. kopf stops its own timers and daemons by it but hands it
    to no handler: here it is read from the arguments of kopf's "daemon killer" task (kopf 1.37 to
    1.45; tests/operator/test_operator_scale.py checks the installed kopf still has it)."""
    for task in asyncio.all_tasks():
        if task.get_name() != "daemon killer":
            continue
        guard: Any = task.get_coro()
        inner = _argument(guard, "coro")
        paused = _argument(inner, "operator_paused")
        if callable(getattr(paused, "is_on", None)) and callable(getattr(paused, "wait_for", None)):
            return paused
    return None


def _argument(coroutine: Any, name: str) -> Any:
    """The argument `name` of a coroutine that has not finished (None otherwise)."""
    frame = getattr(coroutine, "cr_frame", None)
    return frame.f_locals.get(name) if frame is not None else None


@kopf.on.event(*PYTORCHJOBS, labels={LABEL_MANAGED_BY: MANAGED_BY})
async def on_pytorchjob(body: kopf.Body, namespace: str | None, uid: str, type: str | None, **kwargs: Any) -> None:
    """A stage's PyTorchJob changed: reconcile its FineTuneJob (in the handlers' pool), unless
    nothing the job reads from it changed since the last reconcile it woke (the training-operator
    rewrites its status on every pass of its own: lastReconcileTime, replica counts). That is
    decided here, in the event loop: most events are such bookkeeping, and each would otherwise
    take a turn of the handlers' threads."""
    pj = dict(body)
    owner = common.owner_name(pj, "FineTuneJob")
    if type == "DELETED":
        _observed.pop(uid, None)
    if not owner or not namespace:
        return
    seen = _seen(pj)
    if type != "DELETED" and _observed.get(uid) == seen:
        return
    # a restart this event shows is counted even if the pods run again by the time reconcile reads the job
    restart = restarted_at(pj)
    restarts = {pj["metadata"]["name"]: restart} if restart else None
    children = kwargs.get(CHILDREN)
    await common.in_pool(None, functools.partial(
        common.quietly, lambda: reconcile(namespace, owner, restarts=restarts, children=children, trigger="child")))
    if type != "DELETED" and _reconciled.get((namespace, owner)):
        _observed[uid] = seen


def _seen(pj: dict[str, Any]) -> tuple[Any, ...]:
    """What a reconcile reads of a stage's PyTorchJob: its state (from its conditions), times and suspension."""
    return backend.observe(pj), backend.times(pj), backend.is_suspended(pj), backend.suspended_by_us(pj)


# What the last reconcile woken by each PyTorchJob (by uid) saw of it (first, what the reconcile
# that created it saw: the ADDED event of a PyTorchJob with no status yet tells its job nothing),
# and when each job was last reconciled without an error (monotonic seconds): what lets events
# and ticks with nothing new pass.
_observed: dict[str, tuple[Any, ...]] = {}
_reconciled: dict[tuple[str, str], float] = {}
_quiet: dict[tuple[str, str], int] = {}  # the timer's reconciles of each job since another trigger's
SAFETY_NET_TICKS = 6
SAFETY_NET_DOUBLINGS = 3  # 1, 2, 4, then every 8 minutes (at the default 10 s ticks)
_safety_net = SAFETY_NET_TICKS * POLL_SECONDS


CHILD_STATUS = ("conditions", "startTime", "completionTime")  # what a reconcile reads of a PyTorchJob's status


@kopf.index(*PYTORCHJOBS, labels={LABEL_MANAGED_BY: MANAGED_BY})
def pytorchjobs_by_owner(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """The stages' PyTorchJobs by their FineTuneJob: (namespace, job uid) -> what a reconcile reads of
    each (name, uid, labels, annotations, owners, runPolicy, and of the status the conditions and
    times; not the pod templates, which at a thousand jobs would be most of the operator's memory,
    nor the replica counts and selectors the training-operator rewrites on every pass). kopf keeps
    it from the PyTorchJob watch and starts no handler before it holds every PyTorchJob, so a
    reconcile reads its job's stages here instead of listing them (a list of a custom resource by
    label is a read of every PyTorchJob in the namespace from etcd, on every reconcile: quadratic in
    the jobs). It trails the API server by the watch's delay (seconds, under a burst of a thousand
    jobs): a stage's newer state arrives with the event that reconciles its job again, and
    `_stages_of` lists the job's PyTorchJobs when a stage the status names is not here yet."""
    meta = body.get("metadata") or {}
    uid = next((ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("kind") == "FineTuneJob"), None)
    if not uid:
        return {}
    kept = {k: copy.deepcopy(meta[k]) for k in ("name", "namespace", "uid", "labels", "annotations", "ownerReferences")
            if k in meta}
    spec, status = body.get("spec") or {}, body.get("status") or {}
    return {(namespace or "", uid): {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept,
        "spec": {"runPolicy": copy.deepcopy(spec.get("runPolicy") or {})},
        "status": {k: copy.deepcopy(status[k]) for k in CHILD_STATUS if k in status},
    }}


CHILDREN = "pytorchjobs_by_owner"  # kopf passes each index to every handler by its function's name


def _stages_of(children: kopf.Index[tuple[str, str], dict[str, Any]] | None, namespace: str, name: str,
               uid: str, recorded: set[str]) -> list[dict[str, Any]]:
    """The job's PyTorchJobs: from the index (see `pytorchjobs_by_owner`) when it holds every one
    the status records (`recorded`: their names); else listed. A stage the status names but the
    index lacks was created a moment ago and its watch event is not in yet, or was deleted: only
    the API server can tell (believing the index failed half of a burst of 1,000 new jobs with
    "PyTorchJob ... was deleted"). A stage not recorded yet and not in the index is created,
    and the 409 of a stale index finds it (deterministic names)."""
    found = _indexed(children, (namespace, uid))
    if found is not None and recorded <= {pj["metadata"]["name"] for pj in found}:
        return found
    return [pj for pj in common.list_custom(PYTORCHJOBS, namespace, _children_selector(name))
            if any(ref.get("uid") == uid for ref in pj["metadata"].get("ownerReferences") or [])]


def _indexed(children: kopf.Index[tuple[str, str], dict[str, Any]] | None,
             key: tuple[str, str]) -> list[dict[str, Any]] | None:
    """The index's values under `key`, or None without an index. kopf updates the index from its
    event loop while this thread reads it: a read that meets a change is tried again."""
    if children is None:
        return None
    for _ in range(10):
        try:
            return list(children.get(key, []))
        except RuntimeError:
            continue
    return None


def _children_selector(job: str) -> str:
    """The label selector of a FineTuneJob's PyTorchJobs and StageRun ConfigMaps."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_JOB}={label_value(job)}"


@kopf.index(*FINETUNEJOBS, when=_unfinished)
def finetunejobs_by_dataset(name: str, namespace: str | None, spec: Mapping[str, Any],
                            **_: Any) -> dict[tuple[str, str], str]:
    """Unfinished FineTuneJobs by the PreferenceDatasets they read: (namespace, data set) -> job.
    kopf keeps it from the FineTuneJob watch, and drops a job once it finished or was deleted."""
    refs = {((stage.get("dataset") or {}).get("preferenceDatasetRef") or {}).get("name")
            for stage in spec.get("stages") or []}
    return {(namespace or "", ref): name for ref in refs if ref}


@kopf.on.event(*PREFERENCEDATASETS)
def on_preferencedataset(name: str, namespace: str | None, **kwargs: Any) -> None:
    """A data set changed: the unfinished jobs that read it (from the index, not a list of every
    job in the namespace) may start (or fail) now."""
    index: kopf.Index[tuple[str, str], str] = kwargs["finetunejobs_by_dataset"]  # kopf passes indices by name
    if not namespace:
        return
    for job in sorted(set(index.get((namespace, name), []))):
        common.quietly(lambda: reconcile(namespace, job, children=kwargs.get(CHILDREN), trigger="dataset"))


@kopf.on.delete(*FINETUNEJOBS)
def on_finetunejob_deleted(name: str, namespace: str | None, uid: str, **_: Any) -> None:
    """Delete the stages' PyTorchJobs and ConfigMaps now (owner references would, later)."""
    namespace = namespace or ""
    selector = _children_selector(name)
    group, version, plural = PYTORCHJOBS
    for pj in common.list_custom(PYTORCHJOBS, namespace, selector):
        if any(ref.get("uid") == uid for ref in pj["metadata"].get("ownerReferences") or []):
            try:
                common.custom().delete_namespaced_custom_object(
                    group, version, namespace, plural, pj["metadata"]["name"], propagation_policy="Background")
                log.info("Deleted PyTorchJob name=%s finetunejob=%s", pj["metadata"]["name"], name)
            except client.ApiException as e:
                if e.status != 404:
                    raise
    common.core().delete_collection_namespaced_config_map(namespace, label_selector=selector)
    metrics.set_job_conditions(f"{namespace}/{name}", None)
    common.forget("FineTuneJob", namespace, name)
    _reconciled.pop((namespace, name), None)
    _quiet.pop((namespace, name), None)


# --- reconcile ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scraped:
    """What the timer read from a running stage's trainer before taking the job's lock."""

    pytorchjob: str
    pod: dict[str, Any]
    progress: trainer_metrics.TrainerProgress


def reconcile(namespace: str, name: str, *, scrape: bool = False, scraped: Scraped | None = None,
              restarts: dict[str, str] | None = None,
              children: kopf.Index[tuple[str, str], dict[str, Any]] | None = None, trigger: str = "change",
              received: dict[str, Any] | None = None) -> None:
    """Reconcile the job as read now, or as `received` from the watch (its own handlers: one read
    less for each new job in a burst)."""
    with common.locked("FineTuneJob", namespace, name), metrics.reconciling("FineTuneJob", trigger):
        _reconciled.pop((namespace, name), None)
        body = received if received is not None else common.get_custom(FINETUNEJOBS, namespace, name)
        if body is not None and not body["metadata"].get("deletionTimestamp"):
            _reconcile(body, scrape, scraped, restarts, children)
        note_reconciled(namespace, name, trigger)


def note_reconciled(namespace: str, name: str, trigger: str) -> None:
    """When the job was last reconciled without an error, and how many of its reconciles in a row
    were the timer's (what spaces out the safety net's looks, see `_due`)."""
    key = (namespace, name)
    _reconciled[key] = time.monotonic()
    if trigger == "timer":
        _quiet[key] = _quiet.get(key, 0) + 1
    else:
        _quiet.pop(key, None)


def _reconcile(body: dict[str, Any], scrape: bool, scraped: Scraped | None = None,
               restarts: dict[str, str] | None = None,
               children_index: kopf.Index[tuple[str, str], dict[str, Any]] | None = None) -> None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
    key = f"{namespace}/{name}"

    job, problems = check(body)
    if job is None or problems:
        message = "Fix the spec: " + "; ".join(problems) + "."
        invalid = job_conditions(conditions, generation, phase=Phase.INVALID, reason=r.INVALID_SPEC, message=message,
                                 accepted=(False, r.INVALID_SPEC, message))
        if not is_true(conditions, r.FAILED):
            common.event(body, r.INVALID_SPEC, message, warning=True)
        _write(body, status, {"observedGeneration": generation, "conditions": invalid})
        metrics.set_job_conditions(key, common.true_conditions(invalid))
        raise kopf.PermanentError(message)
    failed = find_condition(conditions, r.FAILED)
    if failed and failed.get("status") == "True" and failed.get("reason") != r.INVALID_SPEC:
        metrics.set_job_conditions(key, common.true_conditions(conditions))
        return
    output_base = job.spec.output.uri or ""
    if is_true(conditions, r.SUCCEEDED):
        if not status.get("adapter") and (adapter := publish(body, job, output_base)):
            _write(body, status, {"adapter": adapter})
        metrics.set_job_conditions(key, common.true_conditions(conditions))
        return

    datasets = {
        ref.name: common.get_custom(PREFERENCEDATASETS, namespace, ref.name)
        for ref in (s.dataset.preference_dataset_ref for s in job.spec.stages) if ref is not None
    }
    missing = sorted(n for n, d in datasets.items() if d is None)
    accepted = (True, r.VALID, "The spec passed every check.")
    if missing:
        accepted = (False, r.PREFERENCE_DATASET_NOT_FOUND,
                    f"PreferenceDataset {', '.join(missing)} not found in namespace {namespace}; create it or fix "
                    "spec.stages[].dataset.preferenceDatasetRef.name.")
    recorded = {s["jobName"] for s in status.get("stages") or [] if s.get("jobName")}
    children = {pj["metadata"]["name"]: pj for pj in _stages_of(children_index, namespace, name, meta["uid"], recorded)}
    plan = observe_stages(job, children, list(status.get("stages") or []), output_base, restarts)
    suspend = job.spec.run_policy.suspend
    child = children.get(backend.job_name(name, job.spec.stages[plan.index].name))

    if plan.phase == Phase.START:
        if suspend:
            plan.phase, plan.reason = Phase.SUSPENDED, r.SUSPENDED_BY_USER
            plan.message = f"Suspended before stage {plan.index + 1}/{len(job.spec.stages)} " \
                           f"{job.spec.stages[plan.index].name} (spec.runPolicy.suspend)."
        else:
            start_stage(body, job, plan, datasets, output_base)
    elif child is not None and plan.phase in (Phase.PENDING, Phase.RUNNING, Phase.RESTARTING, Phase.SUSPENDED):
        sync_suspend(body, child, suspend)
    if plan.phase == Phase.FAILED and child is not None and plan.stages[plan.index].get("state") != _old_state(status, plan):
        detail = failure_detail(_pods(namespace, child["metadata"]["name"]))
        if detail:
            plan.message += f" ({detail})"
            plan.stages[plan.index]["message"] += f" ({detail})"
    if scraped is not None and plan.phase == Phase.RUNNING and child is not None \
            and scraped.pytorchjob == child["metadata"]["name"] and common.owned_by(scraped.pod, child):
        note_master_pod(plan.stages[plan.index], scraped.pod)
        apply_progress(plan.stages[plan.index], scraped.progress,
                       stage_output_uri(output_base, job.spec.stages[plan.index]),
                       registry.get(job.spec.stages[plan.index].type).modality == "text")
    if plan.phase == Phase.PENDING and child is not None:
        # looked up by the timer only; other reconciles keep what it found
        previous = (find_condition(conditions, r.RUNNING) or {}).get("message", "")
        kept = previous if previous.startswith(plan.message[:-1] + ": ") else plan.message
        why = why_pending(namespace, child) if scrape else ""
        plan.message = f"{plan.message[:-1]}: {why}" if why else (plan.message if scrape else kept)

    new_conditions = job_conditions(conditions, generation, phase=plan.phase, reason=plan.reason,
                                    message=plan.message, accepted=accepted, suspended=suspend)
    current, text = progress(plan, len(job.spec.stages))
    new = {"observedGeneration": generation, "conditions": new_conditions, "currentStage": current,
           "progress": text, "stages": plan.stages}
    if plan.phase == Phase.SUCCEEDED:
        new["adapter"] = publish(body, job, output_base)
    announce(body, status, new, plan)
    _write(body, status, new)
    metrics.set_job_conditions(key, common.true_conditions(new_conditions))
    if plan.phase == Phase.WAITING:
        raise kopf.TemporaryError(plan.message, delay=WAIT_SECONDS)


def start_stage(
    body: dict[str, Any], job: FineTuneJob, plan: Plan, datasets: dict[str, dict[str, Any] | None], output_base: str
) -> None:
    """Create the StageRun ConfigMap and the PyTorchJob of stage `plan.index`, once; or say why not yet."""
    i, stage, n = plan.index, job.spec.stages[plan.index], len(job.spec.stages)
    namespace, label = body["metadata"]["namespace"], f"Stage {plan.index + 1}/{n} {stage.name}"
    dataset = None
    ref = stage.dataset.preference_dataset_ref
    if ref is not None:
        ds_body = datasets.get(ref.name)
        ready = find_condition((ds_body or {}).get("status", {}).get("conditions"), r.READY)
        stale = ds_body is not None and ready is not None and \
            ready.get("observedGeneration") != ds_body["metadata"].get("generation")
        if ds_body is None or ready is None or ready.get("status") != "True" or stale:
            if ready is not None and ready.get("reason") in (r.DATA_INVALID, r.VALIDATION_FAILED, r.INVALID_SPEC):
                plan.phase, plan.reason = Phase.FAILED, r.PREFERENCE_DATASET_INVALID
                plan.message = f"{label} reads PreferenceDataset {ref.name}, which is not valid: {ready.get('message')}"
                plan.stages[i].update(state="Failed", message=plan.message)
                return
            why = "it does not exist" if ds_body is None else (
                f"its spec changed (generation {(ds_body or {})['metadata'].get('generation')}) since it was validated "
                f"(generation {(ready or {}).get('observedGeneration')})" if stale
                else (ready or {}).get("message") or "it is not validated yet")
            plan.phase, plan.reason = Phase.WAITING, r.WAITING_FOR_DATASET
            plan.message = f"{label} waits for PreferenceDataset {ref.name} to become Ready: {why}"
            return
        ds = PreferenceDataset.model_validate({k: ds_body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
        fmt = FORMAT_BY_SCHEMA[ds.spec.schema_]
        formats = registry.get(stage.type).formats
        if fmt not in formats:
            plan.phase, plan.reason = Phase.FAILED, r.PREFERENCE_DATASET_INVALID
            plan.message = (f"{label} is a {stage.type} stage and reads {' or '.join(formats)} "
                            f"data; PreferenceDataset {ref.name} has schema {ds.spec.schema_}")
            plan.stages[i].update(state="Failed", message=plan.message)
            return
        dataset = StageData(uri=ds.spec.source.uri, format=cast(Any, fmt), columns=ds.spec.columns,
                            validation_fraction=ds.spec.split.validation_fraction)
    settings = RUNTIME.settings
    run = render_stage_run(job, i, output_base, dataset, metrics_port=settings.trainer_metrics_port)
    configmap = backend.stagerun_configmap(job, i, run)
    pj = backend.render(job, i, run, settings)
    kopf.adopt([configmap, pj], owner=common.kopf_body(body))
    name = pj["metadata"]["name"]
    existing_cm, _ = common.create_core("ConfigMap", namespace, configmap)
    existing, created = common.create_custom(PYTORCHJOBS, namespace, pj)
    foreign = [f"{kind} {obj['metadata']['name']}" for kind, obj in (("ConfigMap", existing_cm), ("PyTorchJob", existing))
               if not common.owned_by(obj, body)]
    if foreign:
        plan.phase, plan.reason = Phase.FAILED, r.NAME_CONFLICT
        one = len(foreign) == 1
        plan.message = (f"{label} cannot start: {' and '.join(foreign)} already {'exists' if one else 'exist'} in "
                        f"namespace {namespace} and {'belongs' if one else 'belong'} to something else; delete "
                        f"{'it' if one else 'them'} and recreate this FineTuneJob, or give the job or the stage another name.")
        plan.stages[i].update(state="Failed", message=plan.message)
        return
    if created:
        _observed[existing["metadata"]["uid"]] = _seen(existing)
        metrics.PYTORCHJOBS_CREATED.labels(stage.type).inc()
        log.info("Created PyTorchJob name=%s namespace=%s finetunejob=%s stage=%s", name, namespace,
                 job.metadata.name, stage.name)
        common.event(body, r.EVENT_CREATED, f"Created PyTorchJob {name} for stage {i + 1}/{n} {stage.name}.")
    plan.phase, plan.reason, plan.message = Phase.PENDING, r.STAGE_CREATED, f"{label} waits for its pods (PyTorchJob {name})."
    plan.stages[i].update(state="Pending", jobName=name, message="Created")


def sync_suspend(body: dict[str, Any], child: dict[str, Any], suspend: bool) -> None:
    """Suspend the running stage's PyTorchJob when the job is suspended; resume only what we suspended.
    A stage queued in Kueue is suspended through its Workload instead (backends/kueue.py says why)."""
    name, namespace = child["metadata"]["name"], child["metadata"]["namespace"]
    if kueue.queue_of(child):
        workload = kueue_workload(namespace, child)
        as_asked = suspend != kueue.is_active(workload) if workload else True
        if workload is None or as_asked or (not suspend and not kueue.deactivated_by_us(workload)):
            return  # not made yet (a later reconcile finds it), already as asked, or deactivated by someone else
        group, version, plural = kueue.WORKLOADS
        wl_name = workload["metadata"]["name"]
        common.custom().patch_namespaced_custom_object(group, version, namespace, plural, wl_name,
                                                       kueue.active_patch(not suspend))
        log.info("%s Kueue Workload name=%s namespace=%s", "Deactivated" if suspend else "Activated", wl_name, namespace)
        common.event(body, r.EVENT_SUSPENDED if suspend else r.EVENT_RESUMED,
                     f"{'Deactivated' if suspend else 'Activated'} Kueue Workload {wl_name} of PyTorchJob {name} "
                     "(spec.runPolicy.suspend).")
        return
    if suspend == backend.is_suspended(child) or (not suspend and not backend.suspended_by_us(child)):
        return
    group, version, plural = PYTORCHJOBS
    common.custom().patch_namespaced_custom_object(group, version, namespace, plural, name,
                                                   backend.suspend_patch(suspend))
    log.info("%s PyTorchJob name=%s namespace=%s", "Suspended" if suspend else "Resumed", name, namespace)
    common.event(body, r.EVENT_SUSPENDED if suspend else r.EVENT_RESUMED,
                 f"{'Suspended' if suspend else 'Resumed'} PyTorchJob {name} (spec.runPolicy.suspend).")


def scrape_running_stage(namespace: str, status: Mapping[str, Any]) -> Scraped | None:
    """Read the trainer's step, total steps and last figures from the metrics endpoint of the
    running stage's master pod, on the port the operator renders (not whatever the pod's spec
    says). The reconcile uses them only if that pod belongs to the stage's PyTorchJob (a pod of
    that name made by anyone else is not believed)."""
    port = RUNTIME.settings.trainer_metrics_port
    running = next((s.get("jobName") for s in status.get("stages") or [] if s.get("state") == "Running"), None)
    if not port or not running:
        return None
    try:
        pod = common.core().read_namespaced_pod(backend.master_pod(running), namespace)
    except client.ApiException:
        return None
    ip = (pod.get("status") or {}).get("podIP")
    got = trainer_metrics.scrape(ip, port) if ip else None
    return Scraped(running, pod, got) if got is not None else None


def apply_progress(entry: dict[str, Any], got: trainer_metrics.TrainerProgress, output_uri: str = "",
                   counts_tokens: bool = True) -> None:
    """Copy scraped progress into a stage's status entry, with an ETA from the stage's start: step,
    the last figures, tokens trained (`counts_tokens`: text stages) or samples trained (image and
    audio stages), and the newest complete checkpoint, at `<output_uri>/checkpoint-<step>`."""
    if counts_tokens and got.tokens is not None:
        entry["tokensTrained"] = got.tokens
    elif not counts_tokens and got.samples is not None:
        entry["samplesTrained"] = got.samples
    if got.checkpoint_step is not None and output_uri:
        entry["lastCheckpoint"] = {"step": got.checkpoint_step,
                                   "uri": f"{output_uri.rstrip('/')}/checkpoint-{got.checkpoint_step}"}
    if got.step is not None:
        entry["step"] = got.step
    if got.total_steps:
        entry["totalSteps"] = got.total_steps
    started = entry.get("startTime")
    if started and got.step and got.total_steps:  # from the stage's start: includes loading, so on the safe side
        elapsed = seconds_between(started, now_rfc3339()) or 0.0
        entry["etaSeconds"] = round(elapsed / got.step * max(got.total_steps - got.step, 0), 1)
    if got.metrics:
        entry["metrics"] = {**(entry.get("metrics") or {}), **got.metrics}


def kueue_workload(namespace: str, child: dict[str, Any]) -> dict[str, Any] | None:
    """The Kueue Workload of a queued stage's PyTorchJob; None before Kueue made it (or without Kueue)."""
    try:
        found = common.list_custom(kueue.WORKLOADS, namespace, kueue.workload_selector(child))
    except client.ApiException as e:
        if e.status == 404:  # Kueue is not installed
            return None
        raise
    return found[0] if found else None


def why_pending(namespace: str, child: dict[str, Any]) -> str:
    """Why a stage's pods are not running yet: Kueue has not admitted its Workload, pods the
    scheduler cannot place, or pods the training-operator could not create (its newest Warning,
    e.g. a PodSecurity refusal)."""
    name = child["metadata"]["name"]
    if kueue.queue_of(child) and backend.is_suspended(child):
        workload = kueue_workload(namespace, child)
        return kueue.why_waiting(workload) if workload else "Kueue has not made its Workload yet"
    for pod in _pods(namespace, name):
        scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or []
                          if c.get("type") == "PodScheduled" and c.get("status") == "False"), None)
        if scheduled:
            return f"pod {pod['metadata']['name']} is unschedulable: {scheduled.get('message', '')}"
    warnings = common.core().list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=PyTorchJob,involvedObject.name={name},type=Warning")
    if warnings:
        newest = max(warnings, key=lambda e: int(e["metadata"].get("resourceVersion") or 0))
        return f"{newest.get('reason')}: {newest.get('message')}"
    return ""


def publish(body: dict[str, Any], job: FineTuneJob, output_base: str) -> str | None:
    """Create the job's ModelAdapter (once) when spec.publish asks for one; its name."""
    if job.spec.publish is None or not job.spec.publish.enabled:
        return None
    name = job.spec.publish.adapter_name or child_name(job.metadata.name)
    adapter = {"apiVersion": API_VERSION, "kind": "ModelAdapter",
               "metadata": {"name": name, "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB: label_value(job.metadata.name)}},
               "spec": adapter_spec(job, output_base)}
    kopf.adopt(adapter, owner=common.kopf_body(body))
    existing, created = common.create_custom(MODELADAPTERS, body["metadata"]["namespace"], adapter)
    if not common.owned_by(existing, body):
        common.event(body, r.NAME_CONFLICT, f"ModelAdapter {name} already exists and belongs to something else, so the "
                     "result is not published; delete it or set spec.publish.adapterName.", warning=True)
        return None
    if created:
        log.info("Created ModelAdapter name=%s namespace=%s finetunejob=%s", name, body["metadata"]["namespace"],
                 job.metadata.name)
        runtime, why = publish_runtime(job)
        common.event(body, r.EVENT_PUBLISHED, f"Created ModelAdapter {name} to serve the result with the {runtime} "
                     f"runtime" + (f": {why}." if why else "."))
    return name


# --- status -------------------------------------------------------------------------------


def announce(body: dict[str, Any], old: dict[str, Any], new: dict[str, Any], plan: Plan) -> None:
    """An Event (and the stage-duration metric) for every transition between two statuses."""
    before = {s.get("name"): s.get("state") for s in old.get("stages") or []}
    n = len(new["stages"])
    for i, stage in enumerate(new["stages"]):
        state, label = stage.get("state"), f"Stage {i + 1}/{n} {stage['name']}"
        if state == before.get(stage["name"], "Pending"):
            continue
        if state == "Running":
            common.event(body, r.EVENT_STAGE_STARTED, f"{label} is running (PyTorchJob {stage.get('jobName')}).")
        elif state == "Restarting":
            common.event(body, r.EVENT_STAGE_RESTARTING, f"{label} is restarting: {stage.get('message')}.", warning=True)
        elif state in ("Succeeded", "Failed"):
            took = seconds_between(stage.get("startTime"), stage.get("completionTime"))
            if took is not None:
                metrics.STAGE_DURATION.labels(stage["type"], state.lower()).observe(took)
            if state == "Succeeded":
                common.event(body, r.EVENT_STAGE_SUCCEEDED, f"{label} succeeded"
                             + (f" in {took:.0f}s" if took is not None else "") + f"; output {stage.get('outputUri')}.")
            else:
                common.event(body, r.EVENT_STAGE_FAILED, f"{label} failed: {stage.get('message')}", warning=True)
    was = {c["type"]: c.get("status") for c in old.get("conditions") or []}
    now = {c["type"]: c.get("status") for c in new["conditions"]}
    if now.get(r.SUCCEEDED) == "True" != was.get(r.SUCCEEDED):
        common.event(body, r.EVENT_SUCCEEDED, plan.message)
    if now.get(r.FAILED) == "True" != was.get(r.FAILED) and plan.reason != r.STAGE_FAILED:
        common.event(body, plan.reason, plan.message, warning=True)
    if now.get(r.SUSPENDED) != was.get(r.SUSPENDED, "False") and plan.phase not in (Phase.SUCCEEDED, Phase.FAILED):
        suspended = now.get(r.SUSPENDED) == "True"
        common.event(body, r.EVENT_SUSPENDED if suspended else r.EVENT_RESUMED,
                     "The job is suspended (spec.runPolicy.suspend)." if suspended else "The job was resumed.")


def _old_state(status: dict[str, Any], plan: Plan) -> str | None:
    stages = status.get("stages") or []
    return stages[plan.index].get("state") if plan.index < len(stages) else None


def _pods(namespace: str, pytorchjob: str) -> list[dict[str, Any]]:
    return common.core().list_namespaced_pod(namespace, label_selector=f"training.kubeflow.org/job-name={pytorchjob}")


def _write(body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
    """Merge-patch the fields of `new` that changed, after passing them through FineTuneJobStatus (the
    model the CRD's status schema is generated from), so the operator cannot write what the schema lacks."""
    typed = FineTuneJobStatus.model_validate(new).model_dump(mode="json", by_alias=True, exclude_unset=True)
    new = {k: typed[k] for k in new}  # what was set, including a None that clears a field
    if common.changed(_without_eta(old), _without_eta(new)):
        common.patch_status(FINETUNEJOBS, body, new)


def _without_eta(status: dict[str, Any]) -> dict[str, Any]:
    """`status` less its stages' etaSeconds: an ETA that moved, and nothing else, is not worth a
    write (it moves on every tick of the timer; the next write carries the newest)."""
    if not status.get("stages"):
        return status
    return {**status, "stages": [{k: v for k, v in s.items() if k != "etaSeconds"} for s in status["stages"]]}
