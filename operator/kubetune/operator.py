"""The kubetune operator process: kopf, peering, metrics, and the settings of what it renders.

    kubetune operator --all-namespaces --trainer-image ghcr.io/kubetune/trainer:0.1.0

Replicas coordinate through kopf peering (a `ClusterKopfPeering`, or a `KopfPeering` per
namespace when namespaced, of group kopf.dev; their CRDs are in e2e/operator/peering-crds.yaml
and the Helm chart): each replica announces itself with a priority, and one sees a higher one
pauses, so two replicas never act at once. The priority is random unless given, so of two
replicas exactly one acts; when it dies, its record expires after --peering-lifetime seconds
and the next one resumes. An identity that survives restarts (POD_ID, the pod's name) lets a
restarted replica recognise its own old record.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client

from kubetune import apiclient
from kubetune.api.meta import GROUP
from kubetune.backends import LABEL_DATASET, LABEL_MANAGED_BY, MANAGED_BY, BackendSettings
from kubetune.backends import pytorchjob as pytorchjob_backend
from kubetune.publish import kserve

log = logging.getLogger("kubetune.operator")

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
FINALIZER = f"{GROUP}/finalizer"

# The children the operator watches, each with the label selector the API server filters its
# watch and list requests by: without one, kopf streams every such object in the cluster and
# filters on the handlers' `labels=` after receiving them.
CHILD_SELECTORS: dict[tuple[str, str, str], str] = {
    (pytorchjob_backend.GROUP, pytorchjob_backend.VERSION, pytorchjob_backend.PLURAL): f"{LABEL_MANAGED_BY}={MANAGED_BY}",
    ("batch", "v1", "jobs"): f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_DATASET}",
    (kserve.GROUP, kserve.VERSION, kserve.PLURAL): f"{LABEL_MANAGED_BY}={MANAGED_BY}",
    kserve.APIS["llmInferenceService"].resource: f"{LABEL_MANAGED_BY}={MANAGED_BY}",
}


@dataclass
class OperatorOptions:
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    peering: str = "kubetune"
    standalone: bool = False
    priority: int | None = None
    peering_lifetime: int = 60
    metrics_port: int = 8080
    liveness_port: int = 0
    verbose: bool = False
    scrape_trainer: bool = True
    progress_interval: float = 10.0
    workers: int = 8  # threads running handlers (reconciles) at once
    api_timeout: float = apiclient.DEFAULT_TIMEOUT  # seconds, every request to the API server
    api_qps: float = apiclient.DEFAULT_QPS  # client-side rate limit of the handlers' requests
    api_burst: int = apiclient.DEFAULT_BURST
    backend: BackendSettings = field(default_factory=BackendSettings)


OPTIONS = OperatorOptions()


class RetryForever:
    """kopf's backoffs between retries of a failed API request, without end: 1, 1, 2, 3, 5, 8, 13,
    then every 20 s. kopf's default gives up after 8 retries (54 s); a watch or the peering
    keep-alive that gives up stays dead while the process lives on, so an API server that is away
    a minute (a restart on a busy control plane, an upgrade, an etcd restore) left the operator
    deaf for good. client-go's reflectors retry forever too (their backoff is capped at 30 s).
    A class, not a generator: kopf iterates it anew for every request."""

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1, 1, 2, 3, 5, 8, 13), itertools.repeat(20.0))


# How long kopf waits for the watch event of its own patch before it handles the object's older
# events as they are. kopf's 5 s is shorter than the watch's lag under a burst of a thousand new
# jobs: the event of the create handler's status write, which precedes kopf's patch that records
# the job as handled, was then taken for a job never handled and the create handler ran again
# (1.9 reconciles per job woken by its own change at N = 1,000, against 1.0 at N = 150). Waiting
# longer only holds up a change that arrives in that window, until the patch's event is in.
CONSISTENCY_SECONDS = 30.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf's own settings: our finalizer and annotation prefix, Events, peering lifetime, request
    timeouts and retries, the children's server-side label selectors, the size of the handlers' thread pool."""
    from kubetune.controllers import common

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.consistency_timeout = CONSISTENCY_SECONDS
    settings.posting.reporting_component = "kubetune-operator"
    settings.posting.level = logging.WARNING  # kopf's own "Handler succeeded" chatter stays in the log
    settings.peering.lifetime = OPTIONS.peering_lifetime
    settings.peering.stealth = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = min(60.0, max(OPTIONS.api_timeout, 10.0))
    settings.networking.connect_timeout = 10
    settings.networking.error_backoffs = RetryForever()
    for resource, selector in CHILD_SELECTORS.items():
        settings.watching.label_selectors[resource] = selector
    # A bounded pool: reconciles run in these threads; more objects wait their turn in kopf's queues.
    settings.execution.max_workers = OPTIONS.workers
    common.RUNTIME.handlers = settings.execution.executor  # the async handlers' reconciles run here too


# kopf's own connections (watches, its patches, Events, peering): a watch holds one for as long as
# it streams, per watched resource and, when namespaced, per namespace; requests share the rest.
WATCHED_RESOURCES = 12  # ours (3 kinds, 4 children), kopf's peering and CRD watches, and slack
REQUEST_CONNECTIONS = 16


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """The credentials of the kubernetes client (kopf.login_via_client), on an aiohttp session with
    a bounded pool. kopf's own session has no limit (aiohttp's `limit=0`): a burst of 1,000 new jobs
    left it holding 128 TLS connections, each with 128 KiB of asyncio's buffer, aiohttp's read buffer
    and OpenSSL's state, for one request each. Here the requests beyond the pool wait their turn."""
    import aiohttp

    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    watches = WATCHED_RESOURCES * max(1, len(OPTIONS.namespaces))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=watches + REQUEST_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                               priority=info.priority, expiration=info.expiration, aiohttp_session=session)


def ensure_peering(api: client.ApiClient, options: OperatorOptions) -> None:
    """Create the peering object the replicas meet in (kopf needs it to exist)."""
    custom = apiclient.Requests(api)
    body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "metadata": {"name": options.peering}}
    try:
        if options.namespaces:
            for ns in options.namespaces:
                custom.create_namespaced_custom_object(
                    PEERING_GROUP, PEERING_VERSION, ns, "kopfpeerings", {**body, "kind": "KopfPeering"})
        else:
            custom.create_cluster_custom_object(
                PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", {**body, "kind": "ClusterKopfPeering"})
    except client.ApiException as e:
        if e.status == 404:
            raise SystemExit(
                "The kopf.dev peering CRDs are not installed (ClusterKopfPeering, KopfPeering): apply "
                "e2e/operator/peering-crds.yaml (the Helm chart ships them), or run with --standalone.") from None
        if e.status != 409:
            raise


def tune_malloc(arenas: int = 2, mmap_threshold: int = 256 * 1024, trim_every: float = 10.0) -> None:
    """glibc's malloc, set for an I/O-bound process whose memory comes in bursts (elsewhere than
    glibc: nothing). Three settings:
    - few arenas: each thread that allocates gets a heap arena of its own, so a pool of worker
      threads grows the resident memory with the threads, not with the objects (the effect of
      MALLOC_ARENA_MAX=2);
    - a fixed mmap threshold: glibc raises it to the size of each large block freed, so after the
      first burst the response bodies of lists and watches (hundreds of KiB) come from the heap and
      stay there, fragmenting it; above the threshold they are mapped and given back when freed;
    - a thread that gives free heap pages back to the system every `trim_every` seconds
      (malloc_trim): freed memory in the middle of the heap is otherwise kept until the heap's top
      is free, which after a burst of 1,000 jobs it seldom is.
    Python's own small objects are in pymalloc's arenas, which it returns itself."""
    import ctypes
    import threading
    import time

    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_arena_max, arenas)
        libc.mallopt(m_mmap_threshold, mmap_threshold)
        libc.mallopt(m_trim_threshold, 2 * mmap_threshold)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return

    def trim_forever() -> None:
        while True:
            time.sleep(trim_every)
            trim(0)

    threading.Thread(target=trim_forever, name="malloc-trim", daemon=True).start()


def run(options: OperatorOptions) -> int:
    """Run the operator until SIGINT/SIGTERM."""
    from kubernetes import config

    tune_malloc()

    from kubetune import controllers, metrics  # importing registers the handlers
    from kubetune.controllers import common

    controllers.finetunejob.register_timer(options.progress_interval, peering=not options.standalone)

    global OPTIONS
    OPTIONS = options
    kopf.configure(verbose=options.verbose, log_format=kopf.LogFormat.PLAIN)
    if not options.verbose:  # kopf's per-object "Handler ... succeeded" lines; ours say what happened
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    common.RUNTIME.api = apiclient.ApiClient(timeout=options.api_timeout, qps=options.api_qps, burst=options.api_burst)
    common.RUNTIME.settings = options.backend
    common.RUNTIME.scrape_trainer = options.scrape_trainer
    if not options.standalone:
        ensure_peering(common.RUNTIME.api, options)
    if options.metrics_port:
        metrics.serve(options.metrics_port)
        log.info("Serving metrics port=%d", options.metrics_port)
    priority = options.priority if options.priority is not None else random.randint(1, 2**31 - 1)
    log.info("Started operator namespaces=%s peering=%s priority=%d trainerImage=%s",
             ",".join(options.namespaces) or "*", "standalone" if options.standalone else options.peering,
             priority, options.backend.trainer_image)
    kopf.run(
        clusterwide=not options.namespaces,
        namespaces=options.namespaces,
        standalone=options.standalone,
        peering_name=None if options.standalone else options.peering,
        priority=priority,
        liveness_endpoint=f"http://0.0.0.0:{options.liveness_port}/healthz" if options.liveness_port else None,
    )
    return 0
