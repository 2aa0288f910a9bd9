"""The operator image runs the operator against the local cluster as the Helm chart runs it.

    make test-images

`kubetune operator` runs from the operator image under `podman run`: uid 65532, read-only root
filesystem, an empty writable /tmp (its HOME), all capabilities dropped, no privilege
escalation, the host's network (the local API server listens on 127.0.0.1), and a kubeconfig
holding the chart's ServiceAccount token mounted read-only. It must answer its liveness probe,
and the three-stage pipeline test of e2e/operator (imported below, run against this operator
instead of the virtualenv's) must pass with it: KWOK plays the stages' pods.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from e2e.conftest import Cluster
from e2e.images.conftest import image, podman_flags
from e2e.operator.conftest import (  # noqa: F401  (fixtures, and the pipeline test run with this image)
    Operator, _cleanup_pvs, namespace, operator_crds, operator_kubeconfig, run_operator, running_operator, workspace,
)
from e2e.operator.test_e2e_operator_pipeline import test_three_stages_run_in_order_and_the_job_succeeds  # noqa: F401

UID = 65532  # the chart's podSecurityContext.runAsUser


@dataclass
class ImageOperator(Operator):
    """The e2e tests' Operator, run from the operator image instead of this checkout's virtualenv."""

    ref: str = ""
    container: str = field(default_factory=lambda: f"kubetune-operator-{uuid.uuid4().hex[:8]}")

    def _config_dir(self) -> Path:
        """The kubeconfig with its CA inlined, readable by the container's user (the test's own
        files are root's, mode 0600), in a folder mounted read-only."""
        conf = yaml.safe_load(self.kubeconfig.read_text())
        for c in conf["clusters"]:
            ca = c["cluster"].pop("certificate-authority", None)
            if ca:
                c["cluster"]["certificate-authority-data"] = base64.b64encode(Path(ca).read_bytes()).decode()
        folder = self.log_dir / "config"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)
        (folder / "kubeconfig").write_text(yaml.safe_dump(conf))
        (folder / "kubeconfig").chmod(0o644)
        return folder

    def start(self) -> None:
        args = ["podman", "run", "--rm", "--name", self.container, *podman_flags(),
                "--network", "host", "--read-only", "--user", f"{UID}:{UID}", "--tmpfs", "/tmp:rw,mode=1777",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--volume", f"{self._config_dir()}:/etc/kubetune:ro", "--env", "KUBECONFIG=/etc/kubetune/kubeconfig",
                "--env", f"POD_ID={self.identity}", self.ref, *self.operator_args()]
        self.launch(args, None, "the operator image's liveness endpoint", 90)

    def kill(self) -> None:
        subprocess.run(["podman", "kill", "--signal", "KILL", self.container], capture_output=True)
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(["podman", "stop", "--time", "30", self.container], capture_output=True)
            self.proc.wait(timeout=60)

    def inspect(self, template: str) -> str:
        return subprocess.run(["podman", "inspect", "--format", template, self.container],
                              capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def operator(cluster: Cluster, operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    yield from run_operator(ImageOperator(cluster, operator_kubeconfig, tmp_path_factory.mktemp("operator-image"),
                                          ref=image("operator")))


def test_operator_image_runs_non_root_on_a_read_only_root_and_answers_its_probe(running_operator: Operator) -> None:
    op = running_operator
    assert isinstance(op, ImageOperator)
    assert op.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    proc = subprocess.run(["podman", "exec", op.container, "python", "-c",
                           "import os, pathlib; print(os.getuid(), os.getgid());"
                           "p = pathlib.Path('/opt/venv/x'); p.touch()"], capture_output=True, text=True)
    assert proc.stdout.split() == [str(UID), str(UID)], proc.stdout + proc.stderr
    assert "Read-only file system" in proc.stderr, proc.stderr
    assert "Started operator" in op.log_text()
    assert "Serving metrics" in op.log_text()
    assert op.metrics(), "the operator's /metrics answered nothing"
