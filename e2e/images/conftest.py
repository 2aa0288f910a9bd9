"""Fixtures of the image tests: kubetune's images, built by `make images`, run with podman.

    make test-images        # builds the images (cached layers), then runs these tests

They are not part of `make test` (`pytest e2e` skips this folder unless KUBETUNE_IMAGE_TESTS=1):
a cold build of the trainer image downloads several GB from PyPI and takes longer than the rest
of CI. Every container runs as the Helm chart and the operator run it: non-root, read-only root
filesystem, writable /tmp (and /cache for trainer and server) only, host folders mounted as volumes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.conftest import REPO
from e2e.node import NODE_IMAGE
from kubetune.api import render_stage_run
from kubetune.local.runner import load_plan

# `pytest e2e` (make e2e) leaves these tests alone; `make test-images` turns them on.
IMAGE_TESTS = os.environ.get("KUBETUNE_IMAGE_TESTS") == "1"
collect_ignore_glob = [] if IMAGE_TESTS else ["test_*.py"]
if IMAGE_TESTS:
    # the training-operator's init container for PyTorchJob workers comes from the real node's own
    # image (e2e/node.py; nothing can be pulled here), given to it when the cluster starts
    os.environ.setdefault("KUBETUNE_PYTORCH_INIT_IMAGE", NODE_IMAGE)

APP_VERSION = re.search(r'^appVersion:\s*"?([^"\s]+)"?', (REPO / "helm/kubetune/Chart.yaml").read_text(), re.M)[1]
REGISTRY = os.environ.get("KUBETUNE_IMAGE_REGISTRY", "ghcr.io/kubetune")


def podman_flags() -> list[str]:
    """The runtime and rlimit flags of images/common.sh (runc; rlimits no higher than the host's)."""
    out = subprocess.run(["bash", "-c", '. images/common.sh; printf "%s\\n" "${KUBETUNE_PODMAN_RUN_FLAGS[@]}"'],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def image(name: str) -> str:
    """The reference the chart's defaults use for image `name`; fails when it was not built."""
    ref = f"{REGISTRY}/{name}:{APP_VERSION}"
    if subprocess.run(["podman", "image", "exists", ref]).returncode != 0:
        pytest.fail(f"image {ref} does not exist; build it with `make images`")
    return ref


def podman_run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` with this machine's flags; fails the test with the output if it fails."""
    cmd = ["podman", "run", "--rm", *podman_flags(), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def writable_by(path: Path, uid: int) -> Path:
    """A host folder the container's user may write (what fsGroup does for a pod's volume)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, uid, uid)
    else:
        path.chmod(0o777)
    return path


MANIFEST = REPO / "examples" / "pipeline-tiny.yaml"
UID_TRAINER = 1000  # the trainer image's user, and the operator's --run-as-user


@dataclass(frozen=True)
class PretrainStage:
    """The demo's first stage, trained from the same data by this checkout (`local`) and by the
    trainer image (`container`): `<folder>/pretrain/` holds each one's output."""

    local: Path
    container: Path


def _stage_run(output_base: str, stage_dir: Path) -> Path:
    """The StageRun of the manifest's first stage, written as `kubetune run` writes it."""
    plan = load_plan(MANIFEST)
    assert plan.job.spec.stages[0].type == "pretrain"
    run = render_stage_run(plan.job, 0, output_base, None, 0)
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / "stagerun.json"
    path.write_text(run.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    return path


@pytest.fixture(scope="session")
def pretrain_stage(tmp_path_factory: pytest.TempPathFactory) -> PretrainStage:
    """Runs the stage locally (`kubetune-train` in this virtualenv, as `kubetune run` does), then
    in the trainer image as a pod runs it: uid 1000, read-only root filesystem, /cache and /tmp
    empty and writable (the operator's emptyDirs), the data read-only, the output a host folder."""
    ref = image("trainer")
    tmp = tmp_path_factory.mktemp("pretrain")
    job = tmp / "job"  # the manifest's folder: its dataset uris are relative to it
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(job / "data")],
                   check=True, capture_output=True)
    job.chmod(0o755)

    local = tmp / "local"
    run_file = _stage_run(f"file://{local}", local / "pretrain")
    env = {**os.environ, "KUBETUNE_BASE_DIR": str(job), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer.launch", "--nproc-per-node=1", str(run_file)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = writable_by(tmp / "container", UID_TRAINER)
    _stage_run("file:///out", writable_by(out / "pretrain", UID_TRAINER))
    podman_run(
        "--read-only", "--user", f"{UID_TRAINER}:{UID_TRAINER}", "--network", "none", "--shm-size", "256m",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--tmpfs", "/cache:rw,mode=1777", "--tmpfs", "/tmp:rw,mode=1777",
        "--volume", f"{job}:/job:ro", "--volume", f"{out}:/out:rw",
        "--env", "KUBETUNE_BASE_DIR=/job", "--env", "HF_HUB_OFFLINE=1",
        ref, "--nproc-per-node=1", "/out/pretrain/stagerun.json",
        timeout=900,
    )
    return PretrainStage(local=local, container=out)
