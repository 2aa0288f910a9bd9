"""The serving image serves what the trainer image trained, as KServe runs it.

    make test-images

`kubetune-serve` runs from the serving image under `podman run`: uid 1000, read-only root
filesystem, /tmp and /cache empty and writable, the pretrain stage's output of the trainer
image test mounted read-only at /mnt/models (where KServe's storage-initializer puts it). It
must become ready and answer the stage's held-out prompt over the OpenAI-compatible route with
what the trainer generated for it (both decode greedily from the same weights).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from e2e.conftest import free_port
from e2e.images.conftest import PretrainStage, image, podman_flags

UID = 1000  # the serving image's user (the chart's servingRuntime.securityContext)


def request(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return int(rsp.status), json.loads(rsp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read() or b"{}")


def test_serving_image_answers_the_held_out_prompt_like_the_trainer(pretrain_stage: PretrainStage) -> None:
    stage = pretrain_stage.container / "pretrain"
    metrics = json.loads((stage / "metrics.json").read_text())
    port, name = free_port(), f"kubetune-serving-{uuid.uuid4().hex[:8]}"
    subprocess.run(["podman", "run", "--detach", "--rm", "--name", name, *podman_flags(),
                    "--network", "host", "--read-only", "--user", f"{UID}:{UID}",
                    "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                    "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", "/cache:rw,mode=1777",
                    "--volume", f"{stage}:/mnt/models:ro", "--env", "HF_HUB_OFFLINE=1", "--env", "OMP_NUM_THREADS=1",
                    image("serving"), "--model_dir", "/mnt/models", "--model_name", "pretrain",
                    "--http_port", str(port), "--enable_grpc", "false"],
                   check=True, capture_output=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if request(f"{url}/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            running = subprocess.run(["podman", "container", "exists", name]).returncode == 0
            if not running or time.monotonic() > deadline:
                logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
                pytest.fail(f"the serving image did not become ready:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
            time.sleep(1)
        status, body = request(f"{url}/openai/v1/completions", {
            "model": "pretrain", "prompt": metrics["sample"]["prompt"], "max_tokens": 8, "temperature": 0})
    finally:
        subprocess.run(["podman", "stop", "--time", "10", name], capture_output=True)
    assert status == 200, body
    answer = body["choices"][0]["text"].split()
    expected = metrics["sample"]["after"].split()
    print(f"served: {answer}\ntrainer: {expected}")
    assert len(answer) >= 3 and answer[:3] == expected[:3], (answer, expected)
