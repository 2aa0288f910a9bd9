"""The `kubetune` command.

    kubetune crds [--check]                 render crds/ from kubetune.api
    kubetune validate FILE...               check manifests offline, as the API server would
    kubetune validate-data FILE --format F  check a data file row by row
    kubetune run FILE [--nproc N] [--resume]  run a FineTuneJob on this machine
    kubetune status runs/<job>              where a local run stands
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
    from kubetune.local.runner import EXIT_INVALID, Runner, RunError

    try:
        runner = Runner(Path(args.file), Path(args.runs_dir), nproc=args.nproc, resume=args.resume,
                        metrics_port=args.metrics_port, console=console)
        return runner.run()
    except RunError as e:
        console.print(f"[bold red]Refused[/]: {e}", highlight=False)
        return EXIT_INVALID


def _status(args: argparse.Namespace, console: Console) -> int:
    from kubetune.local.runner import status

    return status(Path(args.run_dir), console)


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
    r.add_argument("file", help="manifest holding one FineTuneJob (and the PreferenceDatasets it reads)")
    r.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun --nproc-per-node)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from where it stopped")
    r.add_argument("--runs-dir", default="runs", help="where runs live: <runs-dir>/<job>/<stage>/ (default: runs)")
    r.add_argument("--metrics-port", type=int, default=0, help="serve the trainer's Prometheus metrics here (0: off)")
    r.set_defaults(func=_run)

    s = sub.add_parser("status", help="show where a local run stands")
    s.add_argument("run_dir", help="runs/<job>")
    s.set_defaults(func=_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(highlight=False)
    code: int = args.func(args, console)
    return code


if __name__ == "__main__":
    sys.exit(main())
