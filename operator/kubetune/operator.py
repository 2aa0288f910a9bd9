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

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client

from kubetune.api.meta import GROUP
from kubetune.backends import BackendSettings

log = logging.getLogger("kubetune.operator")

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
FINALIZER = f"{GROUP}/finalizer"


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
    backend: BackendSettings = field(default_factory=BackendSettings)


OPTIONS = OperatorOptions()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf's own settings: our finalizer and annotation prefix, Events, peering lifetime."""
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
    settings.networking.request_timeout = 60


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


def ensure_peering(api: client.ApiClient, options: OperatorOptions) -> None:
    """Create the peering object the replicas meet in (kopf needs it to exist)."""
    custom = client.CustomObjectsApi(api)
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


def run(options: OperatorOptions) -> int:
    """Run the operator until SIGINT/SIGTERM."""
    from kubernetes import config

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
    common.RUNTIME.api = client.ApiClient()
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
