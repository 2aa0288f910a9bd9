"""The `kubetune` command.

    kubetune crds [--check]                 render crds/ from kubetune.api
    kubetune validate FILE...               check manifests offline, as the API server would
    kubetune validate-data FILE --format F  check a data file row by row
    kubetune run FILE [--nproc N] [--resume]  run a FineTuneJob on this machine
    kubetune status runs/<job>              where a local run stands
    kubetune operator [--all-namespaces | --namespace NS ...]  run the operator (kopf)
    kubetune serve OUTPUT_DIR [--adapter NAME=DIR ...] [--port N]  serve a stage's model (kubetune-serve)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console


def _crds(args: argparse.Namespace, console: Console) -> int:
    from kubetune.api import crds

    out = Path(args.out)
    if args.check:
        stale = crds.check(out)
        if stale:
            console.print(f"{out} differs from kubetune.api: {', '.join(stale)}; run `kubetune crds` and commit")
            return 1
        console.print(f"{out} matches kubetune.api")
        return 0
    for path in crds.write(out):
        console.print(f"Wrote {path}")
    return 0


def _validate(args: argparse.Namespace, console: Console) -> int:
    from kubetune.api.validation import validate_file

    failed = False
    for name in args.files:
        path = Path(name)
        if not path.exists():
            console.print(f"{name}: no such file")
            failed = True
            continue
        for label, problems in validate_file(path):
            errors = [p for p in problems if p.severity == "error"]
            failed = failed or bool(errors)
            console.print(f"{name} {label}: {'invalid' if errors else 'valid'}", highlight=False, soft_wrap=True)
            for p in problems:
                console.print(f"  {p}", markup=False, highlight=False, soft_wrap=True)
    return 1 if failed else 0


def _validate_data(args: argparse.Namespace, console: Console) -> int:
    from kubetune_trainer.data.cli import validate_main

    argv = ["--format", args.format, *(f"--columns={c}" for c in args.columns or []), args.file]
    return int(validate_main(argv + (["--json"] if args.json else [])))


def _run(args: argparse.Namespace, console: Console) -> int:
    from kubetune.local.runner import EXIT_INVALID, Runner, RunError, load_plans

    manifest = Path(args.file)
    try:  # every job of the file is checked (and its run folder claimed) before the first one starts
        runners = [Runner(manifest, Path(args.runs_dir), nproc=args.nproc, resume=args.resume,
                          metrics_port=args.metrics_port, console=console, plan=plan) for plan in load_plans(manifest)]
    except RunError as e:
        console.print(f"[bold red]Refused[/]: {e}", highlight=False)
        return EXIT_INVALID
    for runner in runners:  # in file order; a job that fails stops the ones after it
        if code := runner.run():
            return code
    return 0


def _status(args: argparse.Namespace, console: Console) -> int:
    from kubetune.local.runner import status

    return status(Path(args.run_dir), console)


def _serve(args: argparse.Namespace, console: Console) -> int:
    try:  # the serving package needs `kserve`, which the operator does not
        from kubetune_serve.server import main as serve_main
    except ImportError as e:
        console.print(f"[bold red]Refused[/]: kubetune serve needs the serve extra ({e}); "
                      "install it with pip install 'kubetune[serve]'", highlight=False)
        return 2
    argv = ["--model_dir", args.output_dir, "--http_port", str(args.port), "--enable_grpc", "false"]
    argv += [f"--adapter={a}" for a in args.adapter or []]
    argv += ["--model_name", args.name] if args.name else []
    argv += ["--base_model_dir", args.base] if args.base else []
    return serve_main(argv)


def _operator(args: argparse.Namespace, console: Console) -> int:
    from kubetune.backends import BackendSettings
    from kubetune.operator import OperatorOptions, run

    def pairs(items: list[str] | None) -> dict[str, str]:
        return dict(i.split("=", 1) for i in items or [])

    def toleration(text: str) -> dict[str, str]:  # KEY[=VALUE][:EFFECT], as `kubectl taint` writes taints
        key, _, effect = text.partition(":")
        key, eq, value = key.partition("=")
        out = {"key": key, "operator": "Equal" if eq else "Exists"}
        if eq:
            out["value"] = value
        if effect:
            out["effect"] = effect
        return out

    backend = BackendSettings(
        trainer_image=args.trainer_image, image_pull_policy=args.image_pull_policy,
        service_account=args.service_account, storage_secret=args.storage_secret,
        restricted_security_context=not args.no_restricted_security_context, run_as_user=args.run_as_user,
        trainer_metrics_port=args.trainer_metrics_port,
        validation_node_selector=pairs(args.validation_node_selector),
        validation_tolerations=[toleration(t) for t in args.validation_toleration or []],
    )
    return run(OperatorOptions(
        namespaces=[] if args.all_namespaces else (args.namespace or []), peering=args.peering,
        standalone=args.standalone, priority=args.priority, peering_lifetime=args.peering_lifetime,
        metrics_port=args.metrics_port, liveness_port=args.liveness_port, verbose=args.verbose,
        scrape_trainer=not args.no_trainer_progress, progress_interval=args.progress_interval, backend=backend,
        workers=args.workers, api_timeout=args.api_timeout, api_qps=args.api_qps, api_burst=args.api_burst,
    ))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune", description="Every stage of model training, on Kubernetes or here.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("crds", help="write crds/*.yaml from kubetune.api")
    c.add_argument("--out", default="crds", help="folder of the CRD files (default: crds)")
    c.add_argument("--check", action="store_true", help="exit 1 if the files differ instead of writing them")
    c.set_defaults(func=_crds)

    v = sub.add_parser("validate", help="check kubetune manifests offline")
    v.add_argument("files", nargs="+", help="YAML files (several documents each are fine)")
    v.set_defaults(func=_validate)

    d = sub.add_parser("validate-data", help="check a data file row by row")
    d.add_argument("file", help="file or uri (file://, pvc://, s3://)")
    d.add_argument("--format", required=True, help="text, promptCompletion, messages, preference, unpairedPreference, ...")
    d.add_argument("--columns", action="append", metavar="NAME=COLUMN", help="read field NAME from COLUMN")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=_validate_data)

    r = sub.add_parser("run", help="run a FineTuneJob on this machine")
    r.add_argument("file", help="manifest of FineTuneJobs, run one after another (and the PreferenceDatasets they read)")
    r.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun --nproc-per-node)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from where it stopped")
    r.add_argument("--runs-dir", default="runs", help="where runs live: <runs-dir>/<job>/<stage>/ (default: runs)")
    r.add_argument("--metrics-port", type=int, default=0, help="serve the trainer's Prometheus metrics here (0: off)")
    r.set_defaults(func=_run)

    s = sub.add_parser("status", help="show where a local run stands")
    s.add_argument("run_dir", help="runs/<job>")
    s.set_defaults(func=_status)

    o = sub.add_parser("operator", help="run the kubetune operator against the cluster of the kubeconfig (or in-cluster)")
    where = o.add_mutually_exclusive_group()
    where.add_argument("--namespace", action="append", metavar="NS", help="watch this namespace (repeat for more)")
    where.add_argument("--all-namespaces", action="store_true", help="watch every namespace (the default)")
    o.add_argument("--peering", default="kubetune", help="kopf peering object the replicas share (default: kubetune)")
    o.add_argument("--standalone", action="store_true", help="no peering: only ever run one replica")
    o.add_argument("--priority", type=int, default=None, help="peering priority; the highest acts (default: random)")
    o.add_argument("--peering-lifetime", type=int, default=60, help="seconds before a silent replica counts as gone")
    o.add_argument("--metrics-port", type=int, default=8080, help="serve Prometheus /metrics here (0: off)")
    o.add_argument("--liveness-port", type=int, default=0, help="serve /healthz here (0: off)")
    o.add_argument("--trainer-image", default=_default_image(), help="image of stages and validation Jobs")
    o.add_argument("--image-pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"])
    o.add_argument("--service-account", default=None, help="ServiceAccount of the training and validation pods")
    o.add_argument("--storage-secret", default="kubetune-storage",
                   help="Secret with s3 credentials (AWS_*) the pods read when they use s3:// (optional)")
    o.add_argument("--no-restricted-security-context", action="store_true",
                   help="do not set the PodSecurity-restricted securityContext on pods")
    o.add_argument("--run-as-user", type=int, default=1000, help="uid of the pods (with the restricted context)")
    o.add_argument("--trainer-metrics-port", type=int, default=9310, help="port of the trainer's metrics (0: off)")
    o.add_argument("--no-trainer-progress", action="store_true", help="do not read progress from the trainer's metrics")
    o.add_argument("--progress-interval", type=float, default=10.0,
                   help="seconds between reads of a running stage's progress (default: 10)")
    o.add_argument("--validation-node-selector", action="append", metavar="KEY=VALUE",
                   help="node label the validation Job's pods need (repeat for more)")
    o.add_argument("--validation-toleration", action="append", metavar="KEY[=VALUE][:EFFECT]",
                   help="taint the validation Job's pods tolerate (repeat for more)")
    o.add_argument("--workers", type=int, default=8, help="reconciles run at once (threads; default: 8)")
    o.add_argument("--api-timeout", type=float, default=30.0,
                   help="seconds before a request to the API server fails and its reconcile is retried (default: 30)")
    o.add_argument("--api-qps", type=float, default=400.0,
                   help="client-side rate limit of the operator's requests, per second (0: none; default: 400)")
    o.add_argument("--api-burst", type=int, default=800, help="requests allowed at once above --api-qps (default: 800)")
    o.add_argument("-v", "--verbose", action="store_true", help="log kopf's details too")
    o.set_defaults(func=_operator)

    sv = sub.add_parser("serve", help="serve a stage's model over HTTP (OpenAI-compatible and KServe v1/v2 routes)")
    sv.add_argument("output_dir", help="a stage output folder: <output>/<stage> (a model, or an adapter on its base)")
    sv.add_argument("--adapter", action="append", metavar="NAME=DIR", help="another adapter on the same base (repeatable)")
    sv.add_argument("--port", type=int, default=8080, help="HTTP port (default: 8080)")
    sv.add_argument("--name", default=None, help="the model name clients send (default: the folder's name)")
    sv.add_argument("--base", default=None, help="the adapters' base model folder, when the one they recorded is gone")
    sv.set_defaults(func=_serve)
    return p


def _default_image() -> str:
    from kubetune.backends import DEFAULT_TRAINER_IMAGE

    return DEFAULT_TRAINER_IMAGE


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(highlight=False)
    code: int = args.func(args, console)
    return code


if __name__ == "__main__":
    sys.exit(main())
