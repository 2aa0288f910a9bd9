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


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf's own settings: our finalizer and annotation prefix, Events, peering lifetime, request
    timeouts and retries, the children's server-side label selectors, the size of the handlers' thread pool."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
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


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


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


def fewer_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates a heap arena of its own, so a pool of worker threads
    grows the resident memory with the threads, not with the objects; an I/O-bound process needs
    few (the effect of MALLOC_ARENA_MAX=2). Elsewhere than glibc: nothing."""
    import ctypes

    m_arena_max = -8
    try:
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, arenas)
    except (OSError, AttributeError):
        pass


def run(options: OperatorOptions) -> int:
    """Run the operator until SIGINT/SIGTERM."""
    from kubernetes import config

    fewer_malloc_arenas()

    from kubetune import controllers, metrics  # importing registers the handlers
    from kubetune.controllers import common

    controllers.finetunejob.register_timer(options.progress_interval)

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
