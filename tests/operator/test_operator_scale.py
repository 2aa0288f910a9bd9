"""What keeps the operator cheap at scale: server-side label selectors, the data-set index,
request timeouts and the rate limit, the scrape outside the lock, writes only when needed."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
import pytest
from kopf._cogs.clients import fetching, watching
from kopf._cogs.structs import references
from kubernetes import client

from kubetune import apiclient, metrics
from kubetune import operator as kubetune_operator
from kubetune.backends import trainer_metrics
from kubetune.controllers import common, finetunejob

LOG = logging.getLogger("test")


def configured() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    kubetune_operator.configure(settings=settings)
    return settings


def _resource(group: str, version: str, plural: str) -> references.Resource:
    return references.Resource(group, version, plural, kind=plural[:-1].capitalize(), namespaced=True,
                               verbs=["list", "watch", "patch"])


@pytest.mark.parametrize("resource", sorted(kubetune_operator.CHILD_SELECTORS), ids="/".join)
def test_the_list_and_watch_requests_of_each_child_kind_carry_its_label_selector(
        resource: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The requests kopf itself sends (its list, then its watch) ask the API server to filter."""
    urls: list[str] = []

    async def get(url: str, **_: Any) -> dict[str, Any]:
        urls.append(url)
        return {"items": [], "metadata": {"resourceVersion": "1"}}

    async def stream(url: str, **_: Any) -> Any:
        urls.append(url)
        return
        yield  # an async generator of no events

    monkeypatch.setattr(fetching.api, "get", get)
    monkeypatch.setattr(watching.api, "stream", stream)
    settings, res = configured(), _resource(*resource)

    async def list_and_watch() -> None:
        async for _ in fetching.fetch_objs(settings=settings, resource=res, namespace=None, logger=LOG):
            pass
        async for _ in watching.watch_objs(settings=settings, resource=res, namespace=None,
                                           operator_pause_waiter=asyncio.get_running_loop().create_future()):
            pass

    asyncio.run(list_and_watch())
    selector = kubetune_operator.CHILD_SELECTORS[resource]
    assert len(urls) == 2
    for url in urls:
        assert "labelSelector=" + selector.replace("/", "%2F").replace("=", "%3D").replace(",", "%2C") in url, url


def test_every_kind_watched_besides_kubetunes_own_has_a_server_side_selector() -> None:
    """A handler added later on another kind of child fails here until it gets a selector too."""
    import kubetune.controllers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    settings = configured()
    selectors = [h.selector for h in [*registry._watching.get_all_handlers(), *registry._changing.get_all_handlers()]
                 if h.selector is not None and h.selector.group != "kubetune.io"]
    children = {c for c in kubetune_operator.CHILD_SELECTORS for sel in selectors if sel.check(_resource(*c))}
    assert len(selectors) == len(children) == len(kubetune_operator.CHILD_SELECTORS)
    for child in children:
        assert list(settings.watching.label_selectors.collect(_resource(*child))) == \
            [kubetune_operator.CHILD_SELECTORS[child]]


def test_a_dataset_event_reconciles_only_the_jobs_the_index_names(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_list(*_: Any, **__: Any) -> None:
        raise AssertionError("listed FineTuneJobs")

    reconciled: list[tuple[str, str]] = []
    monkeypatch.setattr(common, "list_custom", no_list)
    monkeypatch.setattr(finetunejob, "reconcile", lambda ns, name, **_: reconciled.append((ns, name)))
    index = {("team", "prefs"): ["b", "a"], ("team", "other"): ["c"], ("elsewhere", "prefs"): ["d"]}

    finetunejob.on_preferencedataset(name="prefs", namespace="team", finetunejobs_by_dataset=index)

    assert reconciled == [("team", "a"), ("team", "b")]


def test_the_index_maps_each_dataset_a_job_reads_to_the_job() -> None:
    spec = {"stages": [{"name": "sft", "dataset": {"uri": "pvc://data/x.jsonl"}},
                       {"name": "dpo", "dataset": {"preferenceDatasetRef": {"name": "prefs"}}},
                       {"name": "kto", "dataset": {"preferenceDatasetRef": {"name": "labels"}}}]}
    assert finetunejob.finetunejobs_by_dataset(name="job", namespace="team", spec=spec) == \
        {("team", "prefs"): "job", ("team", "labels"): "job"}
    assert finetunejob._unfinished({"conditions": [{"type": "Succeeded", "status": "True"}]}) is False


def _status(eta: float, step: int) -> dict[str, Any]:
    return {"observedGeneration": 1, "conditions": [], "currentStage": "sft", "progress": "0/1 sft 10%",
            "stages": [{"name": "sft", "type": "sft", "state": "Running", "jobName": "j-sft", "step": step,
                        "totalSteps": 100, "etaSeconds": eta}]}


def test_no_status_patch_when_only_the_eta_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    patches: list[dict[str, Any]] = []
    monkeypatch.setattr(common, "patch_status", lambda resource, body, status: patches.append(status))
    body = {"metadata": {"namespace": "team", "name": "j", "resourceVersion": "5"}}

    finetunejob._write(body, _status(eta=90.0, step=10), _status(eta=95.5, step=10))
    assert patches == []

    finetunejob._write(body, _status(eta=90.0, step=10), _status(eta=80.0, step=20))
    assert [p["stages"][0]["step"] for p in patches] == [20]
    assert patches[0]["stages"][0]["etaSeconds"] == 80.0  # a write that happens carries the newest ETA


def test_the_trainer_is_read_while_another_reconcile_holds_the_jobs_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow trainer endpoint must not stall the job's other reconciles: the timer reads it first."""
    read_while_locked = threading.Event()
    release = threading.Event()
    pod = {"metadata": {"name": "j-sft-master-0", "ownerReferences": [{"uid": "pj-uid"}]}, "status": {"podIP": "10.0.0.7"}}

    class Core:
        def read_namespaced_pod(self, name: str, namespace: str) -> dict[str, Any]:
            assert (name, namespace) == ("j-sft-master-0", "team")
            return pod

    def scrape(host: str, port: int, timeout: float = 1.0) -> trainer_metrics.TrainerProgress:
        read_while_locked.set()
        return trainer_metrics.TrainerProgress(step=3, total_steps=10)

    got: list[Any] = []
    monkeypatch.setattr(common, "core", lambda: Core())
    monkeypatch.setattr(trainer_metrics, "scrape", scrape)
    monkeypatch.setattr(finetunejob, "reconcile", lambda ns, name, **kw: got.append(kw["scraped"]))

    def hold() -> None:
        with common.locked("FineTuneJob", "team", "j"):
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.05)
    asyncio.run(finetunejob.poll_finetunejob(
        name="j", namespace="team", uid="j-uid",
        status={"conditions": [{"type": "Accepted", "status": "True"}],
                "stages": [{"name": "sft", "state": "Running", "jobName": "j-sft"}]}))
    assert read_while_locked.is_set()
    release.set()
    holder.join()
    assert got[0].pytorchjob == "j-sft" and got[0].progress.step == 3

    entry: dict[str, Any] = {"startTime": "2020-01-01T00:00:00Z"}
    finetunejob.apply_progress(entry, got[0].progress)
    assert (entry["step"], entry["totalSteps"]) == (3, 10) and entry["etaSeconds"] > 0


def _pytorchjob(*conditions: str, reconciled_at: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"metadata": {"name": "j-sft", "namespace": "team", "uid": "pj-uid",
                         "ownerReferences": [{"kind": "FineTuneJob", "name": "j", "uid": "j-uid"}]},
            "spec": {"runPolicy": {"suspend": False}},
            "status": {"lastReconcileTime": reconciled_at,
                       "conditions": [{"type": c, "status": "True", "reason": c} for c in conditions]}}


@pytest.fixture
def reconciles(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    def reconcile(namespace: str, name: str, trigger: str = "change", **_: Any) -> None:
        calls.append((namespace, name))
        finetunejob.note_reconciled(namespace, name, trigger)

    monkeypatch.setattr(finetunejob, "reconcile", reconcile)
    monkeypatch.setattr(finetunejob, "_observed", {})
    monkeypatch.setattr(finetunejob, "_reconciled", {})
    monkeypatch.setattr(finetunejob, "_quiet", {})
    return calls


def test_a_pytorchjob_event_with_nothing_new_for_its_job_reconciles_nothing(reconciles: list[tuple[str, str]]) -> None:
    def event(body: dict[str, Any], type_: str = "MODIFIED") -> None:
        asyncio.run(finetunejob.on_pytorchjob(body=body, namespace="team", uid="pj-uid", type=type_))

    event(_pytorchjob("Created"), "ADDED")
    event(_pytorchjob("Created", reconciled_at="2026-01-01T00:00:05Z"))  # the training-operator's own bookkeeping
    assert len(reconciles) == 1
    event(_pytorchjob("Created", "Running"))
    event(_pytorchjob("Created", "Running", reconciled_at="2026-01-01T00:00:09Z"))
    event(_pytorchjob("Created", "Succeeded"))
    assert len(reconciles) == 3
    event(_pytorchjob("Created", "Succeeded"), "DELETED")  # a deleted stage is always looked at
    assert reconciles == [("team", "j")] * 4


def tick(status: dict[str, Any], children: dict[tuple[str, str], list[dict[str, Any]]] | None = None,
         name: str = "j") -> None:
    """One tick of the FineTuneJob timer on one job, as its loop (poll_forever) runs it."""
    asyncio.run(finetunejob.poll_finetunejob(name=name, namespace="team", uid="j-uid", status=status,
                                             **{finetunejob.CHILDREN: children or {}}))


def test_the_timer_leaves_a_started_stage_with_nothing_new_alone_until_the_safety_net(
        reconciles: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finetunejob, "scrape_running_stage", lambda namespace, status: None)
    accepted = [{"type": "Accepted", "status": "True"}]
    running = {"conditions": accepted, "stages": [{"name": "sft", "state": "Running", "jobName": "j-sft"}]}
    pending = {"conditions": accepted, "stages": [{"name": "sft", "state": "Pending", "jobName": "j-sft"}]}
    new = {"conditions": accepted, "stages": [{"name": "sft", "state": "Pending"}]}

    tick({})  # no status yet: its create handler is queued, the tick leaves it to that
    assert reconciles == []
    tick(running)  # never reconciled by this process (a restart): looked at
    tick(running)  # its trainer was read, with nothing to show
    assert len(reconciles) == 1
    tick(pending)
    assert len(reconciles) == 1
    tick(new)  # a stage to start is looked at at once
    assert len(reconciles) == 2
    finetunejob._reconciled[("team", "j")] -= finetunejob._safety_net + 1
    tick(pending)  # the timer's two reconciles in a row doubled the safety net's wait twice
    assert len(reconciles) == 2
    finetunejob._reconciled[("team", "j")] -= 3 * finetunejob._safety_net
    tick(pending)  # why pods wait, now and then
    assert len(reconciles) == 3


def test_the_safety_net_leaves_a_stage_alone_until_the_training_operator_took_it_up(
        reconciles: list[tuple[str, str]]) -> None:
    """A thousand jobs queued at the training-operator: nothing to look up about their pods (there
    are none yet), and the PyTorchJob's first status wakes each job anyway."""
    pending = {"conditions": [{"type": "Accepted", "status": "True"}],
               "stages": [{"name": "sft", "state": "Pending", "jobName": "j-sft"}]}
    untouched = {k: v for k, v in _pytorchjob().items() if k != "status"}
    finetunejob.note_reconciled("team", "j", "change")  # the reconcile that created its PyTorchJob
    finetunejob._reconciled[("team", "j")] -= finetunejob._safety_net + 1

    tick(pending, {("team", "j-uid"): [untouched]})
    assert len(reconciles) == 0
    tick(pending, {("team", "j-uid"): [_pytorchjob("Created")]})  # its pods may wait: say why
    assert len(reconciles) == 1
    finetunejob._reconciled[("team", "j")] -= 2 * finetunejob._safety_net + 1  # the second look waits twice as long
    tick(pending, {})  # not in the index (deleted, or its event not in yet): looked at
    assert len(reconciles) == 2


def test_the_safety_net_looks_less_often_while_nothing_else_wakes_the_job(
        reconciles: list[tuple[str, str]]) -> None:
    """A stage that waits long for its pods (a busy training-operator, a full cluster) is asked why
    after 1, then 2, 4 and 8 times the safety net's wait, and no less often than that; any other
    reconcile (its PyTorchJob moved) starts the count again."""
    pending = {"conditions": [{"type": "Accepted", "status": "True"}],
               "stages": [{"name": "sft", "state": "Pending", "jobName": "j-sft"}]}
    taken_up = {("team", "j-uid"): [_pytorchjob("Created")]}
    key = ("team", "j")

    def looked_after(waits: float) -> bool:
        """Whether a tick looks at the job `waits` safety-net waits after its last reconcile."""
        before = len(reconciles)
        finetunejob._reconciled[key] = time.monotonic() - waits * finetunejob._safety_net - 1
        tick(pending, taken_up)
        return len(reconciles) > before

    finetunejob.note_reconciled(*key, "child")
    assert looked_after(1)
    assert not looked_after(1) and looked_after(2)
    assert not looked_after(3) and looked_after(4)
    assert not looked_after(7) and looked_after(8)
    assert looked_after(8) and looked_after(8)  # capped: every 8 waits from then on
    finetunejob.note_reconciled(*key, "child")
    assert looked_after(1)


def test_a_stage_hand_off_does_not_wait_behind_the_timers_reconciles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timer's reconciles run in a pool of their own: with every one of them stuck (an API
    server answering slowly), a finished stage still starts the next one at once."""
    release, handed_off = threading.Event(), []

    def reconcile(namespace: str, name: str, **kw: Any) -> None:
        if kw.get("scrape"):  # the timer's
            release.wait(10)
        else:
            handed_off.append(name)
        finetunejob._reconciled[(namespace, name)] = time.monotonic()

    monkeypatch.setattr(finetunejob, "reconcile", reconcile)
    monkeypatch.setattr(finetunejob, "_observed", {})
    monkeypatch.setattr(finetunejob, "_reconciled", {})
    monkeypatch.setattr(common.RUNTIME, "handlers", ThreadPoolExecutor(1))
    monkeypatch.setattr(common.RUNTIME, "background", ThreadPoolExecutor(common.BACKGROUND_WORKERS))
    new = {"conditions": [{"type": "Accepted", "status": "True"}], "stages": [{"name": "sft", "state": "Pending"}]}

    async def main() -> float:
        ticks = [asyncio.create_task(finetunejob.poll_finetunejob(name=f"w{i}", namespace="team", uid=f"w{i}",
                                                                  status=new)) for i in range(20)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await asyncio.wait_for(finetunejob.on_pytorchjob(body=_pytorchjob("Created", "Succeeded"), namespace="team",
                                                         uid="pj-uid", type="MODIFIED"), 5)
        took = time.monotonic() - started
        release.set()
        await asyncio.gather(*ticks)
        return took

    took = asyncio.run(main())
    assert handed_off == ["j"] and took < 1.0


def test_the_jobs_by_condition_gauge_moves_by_each_jobs_own_change() -> None:
    value = lambda c: metrics.REGISTRY.get_sample_value("kubetune_finetunejobs", {"condition": c})  # noqa: E731
    before = {c: value(c) for c in metrics.TRACKED_CONDITIONS}
    metrics.set_job_conditions("scale/a", {"Accepted", "Running", "NotTracked"})
    metrics.set_job_conditions("scale/a", {"Accepted", "Running"})
    metrics.set_job_conditions("scale/b", {"Accepted", "Running"})
    metrics.set_job_conditions("scale/a", {"Accepted", "Succeeded", "Ready"})
    assert (value("Accepted") - before["Accepted"], value("Running") - before["Running"],
            value("Succeeded") - before["Succeeded"]) == (2, 1, 1)
    metrics.set_job_conditions("scale/gone", None)  # a job never recorded: nothing moves
    metrics.set_job_conditions("scale/a", None)
    metrics.set_job_conditions("scale/b", None)
    assert {c: value(c) for c in metrics.TRACKED_CONDITIONS} == before


# --- the API client -------------------------------------------------------------------------


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def _client(port: int, **kw: Any) -> apiclient.ApiClient:
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    return apiclient.ApiClient(cfg, **kw)


def test_a_request_to_a_black_holed_api_server_fails_instead_of_hanging(black_hole: int) -> None:
    api = _client(black_hole, timeout=0.3, qps=0)
    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        client.CustomObjectsApi(api).get_namespaced_custom_object("kubetune.io", "v1alpha1", "team", "finetunejobs", "j")
    assert time.monotonic() - start < 5  # urllib3 retries a GET a few times, each within the timeout


class Answering(http.server.BaseHTTPRequestHandler):
    """A stand-in API server's handler: every GET answered with `status`, `body` and `answer_headers`."""

    status, body, answer_headers = 200, b"{}", {"Content-Type": "application/json"}

    def do_GET(self) -> None:
        self.send_response(self.status)
        for name, value in {**self.answer_headers, "Content-Length": str(len(self.body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """A local HTTP server of `handler` on a free port, for the block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def test_a_429_comes_back_as_a_retry_after_the_servers_delay() -> None:
    class Throttling(Answering):
        status, body, answer_headers = 429, b"", {"Retry-After": "7"}

    with serving(Throttling) as port:
        api = _client(port, timeout=5)
        with pytest.raises(kopf.TemporaryError) as e:
            client.CustomObjectsApi(api).get_namespaced_custom_object("kubetune.io", "v1alpha1", "team", "finetunejobs", "j")
        assert e.value.delay == 7.0


def test_the_rate_limit_lets_a_burst_through_then_spreads_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(apiclient.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(apiclient.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    bucket = apiclient.TokenBucket(qps=100, burst=5)
    waits = [bucket.take() for _ in range(15)]
    assert waits[:5] == [0.0] * 5
    assert clock[0] - 100.0 == pytest.approx(10 / 100)  # ten over the burst, at 100 a second
    assert apiclient.TokenBucket(qps=0, burst=1).take() == 0.0


def test_the_waits_for_the_rate_limit_are_counted_for_the_metrics() -> None:
    with serving(Answering) as port:
        requests = apiclient.Requests(_client(port, timeout=5, qps=2, burst=1))
        before = metrics.REGISTRY.get_sample_value("kubetune_api_throttled_seconds_total") or 0.0
        for _ in range(2):  # the first within the burst, the second half a second later
            assert requests.request("GET", "/api/v1/namespaces/team/configmaps/c") == {}
        waited = (metrics.REGISTRY.get_sample_value("kubetune_api_throttled_seconds_total") or 0.0) - before
    assert 0.25 <= waited <= 0.5  # half a second, less whatever the first request took


def test_kopf_retries_a_failed_api_request_without_end_and_each_request_from_the_start() -> None:
    backoffs = configured().networking.error_backoffs
    assert not hasattr(backoffs, "__len__")  # kopf counts the attempts of a sized one and gives up after them
    first = list(itertools.islice(iter(backoffs), 100))
    assert first[:7] == [1, 1, 2, 3, 5, 8, 13] and set(first[7:]) == {20.0}
    assert sum(first[:8]) < 60 < sum(first)  # an API server away a minute is waited for
    assert list(itertools.islice(iter(backoffs), 3)) == [1, 1, 2]  # a new request starts over


def test_kopfs_requests_share_a_bounded_pool_of_connections(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A burst of kopf's requests waits for connections of a bounded pool instead of opening one each
    (kopf's own session has no limit), and every request is answered, with the kubeconfig's token."""
    open_now, most, tokens = [0], [0], set()
    lock = threading.Lock()

    class Slow(Answering):
        protocol_version = "HTTP/1.1"  # keep-alive: a connection serves request after request

        def setup(self) -> None:
            super().setup()
            with lock:
                open_now[0] += 1
                most[0] = max(most[0], open_now[0])

        def finish(self) -> None:
            super().finish()
            with lock:
                open_now[0] -= 1

        def do_GET(self) -> None:
            tokens.add(self.headers.get("Authorization"))
            time.sleep(0.05)
            super().do_GET()

    server = contextlib.ExitStack()
    port = server.enter_context(serving(Slow))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: secret}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n")
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(client.Configuration, "_default", None)  # login loads the kubeconfig into the default
    monkeypatch.setattr(kubetune_operator, "OPTIONS", kubetune_operator.OperatorOptions(namespaces=["a", "b"]))
    monkeypatch.setattr(kubetune_operator, "WATCHED_RESOURCES", 2)
    monkeypatch.setattr(kubetune_operator, "REQUEST_CONNECTIONS", 3)  # 2 x 2 namespaces + 3

    async def burst() -> list[int]:
        context = await kubetune_operator.login(logger=LOG, settings=kopf.OperatorSettings())
        assert isinstance(context, kopf.AiohttpSession)
        session = context.aiohttp_session

        async def one(i: int) -> int:
            async with session.get(f"{context.server}/apis/kubetune.io/v1alpha1/finetunejobs/{i}") as response:
                assert await response.json() == {}
                return response.status

        try:
            return list(await asyncio.gather(*(one(i) for i in range(40))))
        finally:
            await session.close()

    with server:
        assert asyncio.run(burst()) == [200] * 40
    assert most[0] == 7  # the pool's limit, reached and never passed
    assert tokens == {"Bearer secret"}


def _one_stage_job() -> dict[str, Any]:
    """A FineTuneJob "j" in namespace "team" of one SFT stage, as the watch brings it (resourceVersion 7)."""
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "team", "uid": "j-uid", "generation": 1, "resourceVersion": "7"},
            "spec": {"model": {"uri": "hf://bench/tiny-llama"}, "output": {"uri": "pvc://out/j"},
                     "stages": [{"name": "sft", "type": "sft", "resources": {"gpusPerNode": 0},
                                 "dataset": {"uri": "pvc://data/sft.jsonl", "format": "messages"}}]}}


def test_the_added_event_of_a_pytorchjob_the_operator_just_created_reconciles_nothing(
        reconciles: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconcile that creates a stage's PyTorchJob knows what its ADDED event will say (no status
    yet): that event costs the job no second reconcile; the training-operator's first status does."""
    from kubetune.api import FineTuneJob
    from kubetune.controllers.pipeline import Phase, Plan

    body = _one_stage_job()
    made: list[dict[str, Any]] = []

    def create(kind: Any, namespace: str, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        made.append({**obj, "metadata": {**obj["metadata"], "namespace": namespace, "uid": f"uid-{len(made)}"}})
        return made[-1], True

    monkeypatch.setattr(common, "create_core", create)
    monkeypatch.setattr(common, "create_custom", create)
    monkeypatch.setattr(common, "event", lambda *a, **kw: None)
    plan = Plan(stages=[{"name": "sft", "state": "Pending"}], phase=Phase.START, index=0)
    finetunejob.start_stage(body, FineTuneJob.model_validate(body), plan, {}, "pvc://out/j")
    pj = made[-1]
    assert pj["kind"] == "PyTorchJob" and plan.stages[0]["jobName"] == pj["metadata"]["name"]

    asyncio.run(finetunejob.on_pytorchjob(body=pj, namespace="team", uid=pj["metadata"]["uid"], type="ADDED"))
    assert reconciles == []
    took_up = {**pj, "status": {"conditions": [{"type": "Created", "status": "True", "reason": "Created"}]}}
    asyncio.run(finetunejob.on_pytorchjob(body=took_up, namespace="team", uid=pj["metadata"]["uid"], type="MODIFIED"))
    assert reconciles == [("team", "j")]


def test_a_new_jobs_create_handler_starts_its_stage_from_the_body_kopf_received_without_reading_it_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One read less per new job (a burst of a thousand is a thousand fewer requests), and the body
    kopf holds is left as it was: the reconcile writes the new resourceVersion into its own copy."""
    body = _one_stage_job()
    made: list[str] = []
    written: list[tuple[str, dict[str, Any]]] = []

    def create(kind: Any, namespace: str, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        made.append(obj["kind"])
        return {**obj, "metadata": {**obj["metadata"], "namespace": namespace, "uid": f"uid-{len(made)}"}}, True

    def patch_status(resource: Any, job: dict[str, Any], status: dict[str, Any]) -> None:
        written.append((job["metadata"]["resourceVersion"], status))
        job["metadata"]["resourceVersion"] = "8"

    def read(*args: Any) -> None:
        raise AssertionError(f"read {args}")

    monkeypatch.setattr(common, "get_custom", read)
    monkeypatch.setattr(common, "list_custom", read)
    monkeypatch.setattr(common, "create_core", create)
    monkeypatch.setattr(common, "create_custom", create)
    monkeypatch.setattr(common, "patch_status", patch_status)
    monkeypatch.setattr(common, "event", lambda *a, **kw: None)
    finetunejob.on_finetunejob(name="j", namespace="team", body=kopf.Body(body), **{finetunejob.CHILDREN: {}})

    assert made == ["ConfigMap", "PyTorchJob"]
    (version, status), = written
    assert version == "7" and status["stages"][0]["jobName"] == "j-sft"
    assert body["metadata"]["resourceVersion"] == "7"


def test_the_timer_is_one_loop_so_kopf_keeps_no_finetunejob_bodies() -> None:
    """kopf keeps the whole latest body of every object of a kind with a timer or daemon (finished
    ones too): the FineTuneJob timer is a loop of the operator's over a slim index instead."""
    from kopf._cogs.structs import references

    finetunejob.register_timer(10.0, peering=True)
    registry = kopf.get_default_registry()
    ftj = references.Resource(*common.FINETUNEJOBS, kind="FineTuneJob", namespaced=True)
    assert not registry._spawning.has_handlers(resource=ftj)
    assert registry._indexing.has_handlers(resource=ftj)
    entry = finetunejob.unfinished_finetunejobs(
        name="j", namespace="team", uid="j-uid",
        status={"conditions": [{"type": "Accepted", "status": "True", "message": "m" * 500}],
                "stages": [{"name": "sft", "state": "Running", "jobName": "j-sft", "metrics": {"loss": 1.0}}]})
    assert entry == {("team", "j"): ("j-uid", {"conditions": [{"type": "Accepted", "status": "True"}],
                                               "stages": [{"name": "sft", "state": "Running", "jobName": "j-sft"}]})}


def test_the_timer_finds_kopfs_pause_state_so_it_pauses_with_peering() -> None:
    """kopf hands its pause state (peering: another replica acts) to no handler; the loop reads it
    from kopf's own task. An upgrade of kopf that moves it fails here, not in a cluster."""
    from kopf._cogs.aiokits import aiotoggles

    found: list[Any] = []
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server="https://127.0.0.1:1")  # nothing answers: only the tasks matter

    async def command() -> None:
        found.append(finetunejob.kopf_pause())

    asyncio.run(kopf.operator(registry=registry, clusterwide=True, standalone=True, _command=command()))
    assert isinstance(found[0], aiotoggles.ToggleSet)


class Pause:
    def __init__(self) -> None:
        self.on = False
        self.off = asyncio.Event()

    def is_on(self) -> bool:
        return self.on

    async def wait_for(self, value: bool) -> None:
        assert value is False
        await self.off.wait()


def test_the_timer_loop_ticks_jobs_with_work_one_at_a_time_and_waits_out_a_pause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    accepted = [{"type": "Accepted", "status": "True"}]
    jobs = {("team", "new"): [("n-uid", {"conditions": accepted, "stages": [{"name": "sft", "state": "Pending"}]})],
            ("team", "queued"): [("q-uid", {})]}  # no status yet: its create handler's
    ticks: list[str] = []
    release = asyncio.Event()

    async def poll(name: str, namespace: str, uid: str, status: dict[str, Any], **_: Any) -> None:
        ticks.append(name)
        await release.wait()  # a slow tick: the next sweeps leave the job alone while it runs

    monkeypatch.setattr(finetunejob, "poll_finetunejob", poll)
    monkeypatch.setattr(finetunejob, "_reconciled", {})
    pause = Pause()

    async def main() -> None:
        loop = asyncio.create_task(finetunejob.poll_forever(0.01, jobs, {}, pause))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        assert ticks == ["new"]
        release.set()
        await asyncio.sleep(0.1)
        assert len(ticks) > 2 and set(ticks) == {"new"}
        pause.on = True
        await asyncio.sleep(0.05)
        paused_at = len(ticks)
        await asyncio.sleep(0.1)
        assert len(ticks) == paused_at  # another replica acts: not a tick
        pause.on = False
        pause.off.set()
        await asyncio.sleep(0.1)
        assert len(ticks) > paused_at
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    asyncio.run(main())


def test_a_tick_the_api_server_refuses_is_logged_on_one_line_and_tried_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # After an API server restart its RBAC cache fills for a moment: a 403 then is retried, and the
    # log says so on the line that names the refusal (the chaos e2e test reads exactly that).
    running = [{"type": "Accepted", "status": "True"}]
    jobs = {("team", "job"): [("uid", {"conditions": running, "stages": [{"name": "sft", "state": "Pending"}]})]}
    refusal = client.ApiException(status=403, reason="Forbidden")
    refusal.body = json.dumps({"kind": "Status", "message": 'finetunejobs.kubetune.io "job" is forbidden: User "x"'})
    ticks: list[str] = []

    async def poll(name: str, **_: Any) -> None:
        ticks.append(name)
        if len(ticks) == 1:
            raise refusal

    monkeypatch.setattr(finetunejob, "poll_finetunejob", poll)
    monkeypatch.setattr(finetunejob, "_reconciled", {})

    async def main() -> None:
        loop = asyncio.create_task(finetunejob.poll_forever(0.01, jobs, {}, None))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger=finetunejob.log.name):
        asyncio.run(main())
    assert len(ticks) > 1  # tried again at the next tick
    refused = [r.getMessage() for r in caplog.records if "is forbidden: User" in r.getMessage()]
    assert refused == ['FineTuneJob timer tick failed, will retry at the next tick: finetunejob=team/job '
                       '(403 Forbidden) finetunejobs.kubetune.io "job" is forbidden: User "x"']
    assert all(r.exc_info is None for r in caplog.records)  # no traceback whose lines lose the "will retry"


def test_the_pytorchjob_index_keeps_what_a_reconcile_reads_and_nothing_the_training_operator_rewrites() -> None:
    """The index holds every stage's PyTorchJob, finished ones too: it keeps their conditions, times,
    owners, labels and suspension, not the pod template nor the replica counts and selectors."""
    from kubetune.controllers.pipeline import restarted_at

    pj = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
          "metadata": {"name": "j-sft", "namespace": "team", "uid": "pj-uid", "resourceVersion": "7",
                       "labels": {"app.kubernetes.io/managed-by": "kubetune"}, "managedFields": [{"manager": "x"}],
                       "ownerReferences": [{"kind": "FineTuneJob", "name": "j", "uid": "j-uid"}]},
          "spec": {"runPolicy": {"suspend": False},
                   "pytorchReplicaSpecs": {"Master": {"template": {"spec": {"containers": [{"name": "pytorch"}]}}}}},
          "status": {"conditions": [{"type": "Restarting", "status": "True", "reason": "PyTorchJobRestarting",
                                     "message": "restarting", "lastTransitionTime": "2026-12-03T10:00:00Z"}],
                     "startTime": "2026-12-03T09:00:00Z",
                     "replicaStatuses": {"Master": {"active": 1, "selector": "training.kubeflow.org/job-name=j-sft"}},
                     "lastReconcileTime": "2026-12-03T10:00:01Z"}}
    entry = finetunejob.pytorchjobs_by_owner(body=kopf.Body(pj), namespace="team")
    kept = entry[("team", "j-uid")]
    assert set(kept["status"]) == {"conditions", "startTime"} and kept["spec"] == {"runPolicy": {"suspend": False}}
    assert set(kept["metadata"]) == {"name", "namespace", "uid", "labels", "ownerReferences"}
    assert finetunejob._seen(kept) == finetunejob._seen(pj) and restarted_at(kept) == "2026-12-03T10:00:00Z"
