"""kubetune-train STAGERUN.json

Runs one stage of a FineTuneJob: reads the StageRun (the trainer's only input), sets up
torch.distributed, seeds, runs the recipe its stage type's registry entry names
(`recipes/<recipe>.py`, e.g. recipes/image_classification.py), and writes the stage's model, tokenizer,
checkpoints, `metrics.json` and `progress.json` to the StageRun's outputUri.

    kubetune-train STAGERUN.json                      one process, or one torchrun worker
    kubetune-train --nproc-per-node 2 STAGERUN.json   start the workers itself (torchrun in-process)
    kubetune-train validate ...                       check a data set (kubetune_trainer.data.cli)

How processes are started. Under `torchrun` (LOCAL_RANK set) each worker trains. Otherwise, with
`--nproc-per-node N` or the PET_NPROC_PER_NODE variable the Kubeflow training-operator sets,
this command is the torchrun agent itself: it reads the same PET_* variables (nnodes, node rank,
master address), starts the workers, and exits with the exit code of the first worker that
failed. (Plain `torchrun` exits 1 whatever its workers did, which would turn every failure
permanent.) On CPU the backend is gloo, on GPUs nccl; DeepSpeed stages initialise through
`deepspeed.init_distributed`.

Exit codes follow the training-operator's ExitCode restart policy (1-127: permanent, the pod is
not restarted; 128-255: retryable, it is):

    0    the stage succeeded
    1    permanent: an invalid StageRun, bad data (DataError, with line numbers), a stage type or
         combination that is not supported, a missing input model or file, or an unexpected error
    2    permanent: bad command line
    201  retryable: out of memory (CUDA or host)
    202  retryable: distributed communication failed (NCCL, gloo, a peer went away, a timeout)
    203  retryable: I/O or network error reading or writing storage
    204  retryable: the accelerator failed (a CUDA error other than out of memory)
    128+N  retryable: killed by signal N (137 SIGKILL, 143 SIGTERM: preemption, eviction)

A retried stage resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import random
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_PERMANENT = 1
EXIT_USAGE = 2
EXIT_OOM = 201
EXIT_DISTRIBUTED = 202
EXIT_IO = 203
EXIT_ACCELERATOR = 204

DIST_TIMEOUT_SECONDS = 3600

log = logging.getLogger("kubetune_trainer")


class StageNotImplemented(ValueError):
    """The StageRun's type has no recipe yet."""


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def exit_code_for(exc: BaseException) -> int:
    """The exit code that tells the training-operator whether restarting can help (see module docstring)."""
    import torch

    chain = _chain(exc)
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    if any(isinstance(e, (torch.OutOfMemoryError, MemoryError)) for e in chain) or "out of memory" in text.lower():
        return EXIT_OOM
    dist_errors: tuple[type[BaseException], ...] = ()
    if torch.distributed.is_available():
        dist_errors = (torch.distributed.DistError,)
    if any(isinstance(e, dist_errors) for e in chain) or any(
        marker in text for marker in ("NCCL", "ProcessGroup", "Connection closed by peer", "Connection reset by peer")
    ):
        return EXIT_DISTRIBUTED
    for e in chain:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return EXIT_PERMANENT
        if isinstance(e, (OSError, ConnectionError, TimeoutError)):
            return EXIT_IO
    accelerator_error = getattr(torch, "AcceleratorError", ())
    if any(isinstance(e, accelerator_error) for e in chain) or "CUDA error" in text:
        return EXIT_ACCELERATOR
    return EXIT_PERMANENT


# --- one worker ---------------------------------------------------------------------------


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def setup_distributed(run: Any) -> tuple[int, int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...); (rank, world, local rank)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        # Rank 0 evaluates on held-out data alone before and after training while the others wait
        # in a collective; the default NCCL timeout (10 minutes) is too short for a large model.
        timeout = datetime.timedelta(seconds=DIST_TIMEOUT_SECONDS)
        if run.distributed.deepspeed is not None:
            import deepspeed

            if not torch.cuda.is_available():
                # DeepSpeed's CPU shared-memory all-reduce is compiled at first use (minutes, and a
                # compiler in the image); gloo does the same job for the CPU runs kubetune makes.
                import deepspeed.comm.torch  # noqa: F401 - the name is shadowed by torch in deepspeed.comm

                setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
        log.info("Joined process group backend=%s rank=%d worldSize=%d", backend, rank, world)
    return rank, world, local_rank


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    from transformers import set_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_seed(seed)


def read_stage_run(path: str) -> Any:
    from kubetune.api import StageRun

    return StageRun.model_validate_json(Path(path).read_text())


def check_stage(run: Any) -> None:
    from kubetune.api import registry

    info = registry.get(run.type)
    if not info.implemented:
        raise StageNotImplemented(registry.not_implemented_message(run.type))
    if run.dataset.format not in info.formats:
        raise ValueError(
            f"stage type {run.type} reads dataset.format {' or '.join(info.formats)}, not {run.dataset.format}"
        )
    if info.reward == "model" and not run.reward_model_uri:
        raise ValueError(f"a {run.type} stage needs a reward model: set {run.type}.rewardModelUri "
                         "or put a reward stage before it")


def recipe_module(run: Any) -> Any:
    """The recipe module of the StageRun's stage type (its registry entry's `recipe`)."""
    return importlib.import_module(f"kubetune_trainer.recipes.{run.info.recipe}")


def _die_with_agent() -> None:
    """torchrun starts workers in sessions of their own, so a killed agent (a killed `kubetune run`,
    an evicted pod's main process) would leave them training; ask the kernel to stop them too."""
    if "LOCAL_RANK" in os.environ:
        import signal

        from kubetune.shared import die_with_parent

        if not die_with_parent(signal.SIGKILL):  # the agent died before the request took effect
            os._exit(128 + signal.SIGKILL)


def run_stage(path: str) -> int:
    """Train one stage in this process; returns the exit code."""
    _die_with_agent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    out: Path | None = None
    output_uri = ""
    metrics = None
    try:
        run = read_stage_run(path)
        from kubetune.shared import write_json

        from kubetune_trainer import callbacks, common, storage

        out = storage.output_path(run.output_uri)
        output_uri = run.output_uri
        check_stage(run)

        rank, world, local_rank = setup_distributed(run)
        seed_everything(run.hyperparameters.seed)
        ctx = common.Context(out=out, rank=rank, world_size=world, local_rank=local_rank)
        if storage.scheme(output_uri) == "s3":  # checkpoints go up as they are written; a new pod starts from them
            if local_rank == 0:
                common.fetch_remote_checkpoint(out, output_uri)
            common.barrier()
            ctx.callbacks.append(callbacks.CheckpointUpload(out, output_uri, rank, local_rank))
        if ctx.is_main:
            callbacks.write_final(out, output_uri, "running")
            metrics = callbacks.Metrics(run.job, run.stage, run.metrics_port)
            ctx.callbacks.append(callbacks.ProgressCallback(out, output_uri, metrics, rl=run.info.reward != "none"))
        log.info("Started stage job=%s stage=%s type=%s method=%s output=%s worldSize=%d",
                 run.job, run.stage, run.type, run.tuning.method, out, world)
        result = recipe_module(run).run(run, ctx)
        if ctx.is_main:
            write_json(out / "metrics.json", result)
            callbacks.write_final(out, output_uri, "succeeded", step=result.get("globalStep", 0),
                                  loss=result.get("trainLoss"))
            uploaded = tuple(p.name for _, p, _ in common.checkpoints(out))  # by CheckpointUpload, as written
            storage.upload(out, run.output_uri, skip=uploaded)
            log.info("Finished stage stage=%s step=%s trainLoss=%s before=%s after=%s", run.stage,
                     result.get("globalStep"), result.get("trainLoss"), result.get("before"), result.get("after"))
        return EXIT_OK  # the other ranks may leave first: torchrun waits for every worker
    except Exception as exc:  # every failure leaves through an exit code the operator can act on
        code = exit_code_for(exc)
        kind = "retryable" if code >= 128 else "permanent"
        log.error("Failed stage exitCode=%d (%s): %s: %s", code, kind, type(exc).__name__, exc)
        log.debug("%s", traceback.format_exc())
        if code == EXIT_PERMANENT and not isinstance(exc, ValueError):
            traceback.print_exc()  # an unexpected error: show where
        if out is not None and rank == 0:
            try:
                from kubetune_trainer import callbacks

                callbacks.write_final(out, output_uri, "failed")
                (out / "error.txt").write_text(f"exitCode={code} {kind}\n{type(exc).__name__}: {exc}\n")
            except OSError:
                pass
        return code
    finally:
        if metrics is not None:
            metrics.close()
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - tearing down after a failure must not mask its exit code
            pass


# --- the agent: start the workers ourselves -----------------------------------------------


def launch_workers(path: str, nproc: int | None) -> int:
    """torchrun in this process (it reads PET_* like torchrun); the first failed worker's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = ["--module"]
    if nproc is not None:
        args.insert(0, f"--nproc-per-node={nproc}")
    if "PET_NNODES" not in os.environ and "PET_RDZV_ENDPOINT" not in os.environ and "PET_MASTER_ADDR" not in os.environ:
        args.insert(0, "--standalone")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [agent] %(name)s: %(message)s", force=True)
    try:
        torchrun(parse_args([*args, "kubetune_trainer.launch", path]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
        log.error("Failed worker rank=%d exitCode=%d", rank, code)
        return code if 0 < code < 256 else EXIT_PERMANENT
    except SignalException as e:
        # torchrun's agent turns SIGTERM (a pod deleted, drained or preempted) into this exception once
        # it has stopped the workers; uncaught, the pod would exit 1, a permanent failure, and the
        # training-operator would not create it again.
        log.error("Stopped by signal=%s exitCode=%d", e.sigval.name, 128 + e.sigval)
        return 128 + int(e.sigval)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "validate":
        from kubetune_trainer.data.cli import validate_main

        return int(validate_main(argv[1:], prog="kubetune-train validate") or 0)
    parser = argparse.ArgumentParser(
        prog="kubetune-train",
        description="Run one stage of a FineTuneJob from its StageRun (see `kubetune-train validate -h` to check data).",
    )
    parser.add_argument("stagerun", help="Path of the StageRun JSON (written by the operator or `kubetune run`).")
    parser.add_argument(
        "--nproc-per-node", type=int, default=None,
        help="Start this many workers on this node (torchrun in-process); default: PET_NPROC_PER_NODE, else one process.",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    is_worker = "LOCAL_RANK" in os.environ
    nproc = args.nproc_per_node
    if not is_worker and (nproc is not None and nproc > 1 or "PET_NPROC_PER_NODE" in os.environ and nproc is None):
        return launch_workers(args.stagerun, nproc)
    return run_stage(args.stagerun)


def leave(code: int) -> None:
    """Exit with `code`. A torchrun worker skips the interpreter's teardown once its stage is done
    and its process group destroyed: in about one ZeRO-3 run on two gloo processes in 30, a
    C++ thread still joinable at that teardown aborted a worker that had finished its stage
    ("terminate called without an active exception", exit 134), and the training-operator would
    retry the finished stage. Every file is written by then; the logs are flushed here."""
    if "LOCAL_RANK" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    leave(main())
