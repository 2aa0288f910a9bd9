"""kubetune-serve --model_dir runs/demo/sft [--adapter NAME=DIR ...] [--http_port 8080]

kubetune's KServe model server: loads a stage output folder (and adapters on its base), registers
one `kserve.Model` per served name with KServe's `ModelServer`, and runs it. What a client gets:

    GET  /v2/health/live, /v2/health/ready, /            liveness and readiness (KServe's)
    GET  /v1/models/<name>, /v2/models/<name>/ready       a model's readiness (KServe's)
    POST /v1/models/<name>:predict, /v2/models/<name>/infer   v1 and v2 inference (models.py)
    GET  /openai/v1/models                                causal LMs by name (openai.py)
    POST /openai/v1/chat/completions, /openai/v1/completions
    GET  /metrics                                         Prometheus (KServe's and metrics.py's)

In an InferenceService the model folder is KServe's storage-initializer download
(`--model_dir /mnt/models`); `--base_model_dir` says where an adapter's base is when the path it
recorded at training time is not there. Every flag of KServe's own model server
(`kserve.model_server.parser`: `--http_port`, `--grpc_port`, `--enable_grpc`, `--workers`, ...)
is accepted too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("kubetune_serve")

DEFAULT_MODEL_DIR = "/mnt/models"  # where KServe's storage-initializer puts storageUri


def parse_adapter(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter {value!r}: write NAME=DIR")
    return name, Path(path)


def parser() -> argparse.ArgumentParser:
    import kserve.model_server

    p = argparse.ArgumentParser(prog="kubetune-serve", parents=[kserve.model_server.parser],
                                description=__doc__.splitlines()[0], conflict_handler="resolve")
    p.add_argument("--model_dir", "--model-dir", default=DEFAULT_MODEL_DIR,
                   help="the stage output folder to serve (default: KServe's /mnt/models)")
    p.add_argument("--model_name", "--model-name", default=None,
                   help="the name clients use (default: the folder's name; 'model' for /mnt/models)")
    p.add_argument("--base_model_dir", "--base-model-dir", type=Path, default=None,
                   help="the base model of the adapters, when the path they recorded is not here")
    p.add_argument("--adapter", action="append", type=parse_adapter, default=[], metavar="NAME=DIR",
                   help="another adapter on the same base, served as NAME (repeatable)")
    return p


def served_name(model_dir: Path, name: str | None) -> str:
    if name:
        return name
    resolved = model_dir.resolve()
    return "model" if str(resolved) == DEFAULT_MODEL_DIR else resolved.name


def build(model_dir: Path, name: str | None = None, adapters: Sequence[tuple[str, Path]] = (),
          base: Path | None = None) -> list[Any]:
    """The kserve.Models serving `model_dir` (and `adapters` on its base), loaded and ready."""
    from kubetune_serve import loading
    from kubetune_serve.models import MODELS

    main = loading.inspect(model_dir, base)
    stages = {served_name(model_dir, name): main}
    # the adapters' base: --base_model_dir, else the main model's base, else the main model itself
    # (an InferenceService sharing one base: /mnt/models is the base, the adapters are beside it)
    adapters_base = base or main.base or main.path
    for adapter_name, path in adapters:
        if adapter_name in stages:
            raise ValueError(f"two models are named {adapter_name}; give each --adapter its own NAME")
        stages[adapter_name] = loading.inspect(path, adapters_base)
    heads = {s.head for s in stages.values()}
    if len(heads) > 1:
        raise ValueError(f"the adapters must have the model's head; got {', '.join(sorted(heads))}")
    head = heads.pop()
    if head not in MODELS:
        raise ValueError(f"kubetune-serve cannot serve a {head} model yet; it serves {', '.join(MODELS)}")
    served = loading.load_language_models(stages)
    return [MODELS[head](s) for s in served.values()]


def install(models: list[Any]) -> None:
    """Put kubetune's routes and metrics on KServe's FastAPI app (before ModelServer.start builds it)."""
    import kserve.model_server

    from kubetune_serve import metrics, openai
    from kubetune_serve.models import LanguageModel

    app = kserve.model_server.app
    lms = {m.name: m.served for m in models if isinstance(m, LanguageModel)}
    if lms:
        openai.register(app, lms, metrics)
    app.add_middleware(metrics.MetricsMiddleware)


def main(argv: Sequence[str] | None = None) -> int:
    import kserve

    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        models = build(Path(args.model_dir), args.model_name, args.adapter, args.base_model_dir)
    except ValueError as e:
        print(f"kubetune-serve: {e}", file=sys.stderr)
        return 2
    install(models)
    log.info("Serving models=%s port=%d", ",".join(m.name for m in models), args.http_port)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=args.enable_grpc,
                       workers=1).start(models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
