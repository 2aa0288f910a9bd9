"""python -m kubetune_serve.demo runs/pipeline-tiny [--stage NAME]

The last step of `make demo`: serve a finished run's last stage (or --stage) with `kubetune serve`
on a free port, send it the held-out prompt its metrics.json sampled, over HTTP, through the
OpenAI-compatible completions route, and print the answer beside the reference. Exit 0 when the
server answered (whether or not the answer is right: the figures before it say how often it is).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

READY_SECONDS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read() or b"{}")


def ask(output: Path, stage: str | None = None) -> int:
    from kubetune_trainer.demo import load_stages

    stages = [m for m in load_stages(output) if m.get("sample") and (stage is None or m["stage"] == stage)]
    if not stages:
        print(f"No finished stage with a held-out sample under {output}" + (f" named {stage}" if stage else ""))
        return 1
    metrics = stages[-1]
    name, sample = metrics["stage"], metrics["sample"]
    expected = sample.get("reference", sample.get("chosen"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "serve", str(output / name), "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + READY_SECONDS
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    print(f"kubetune serve did not come up:\n{log.read()[-3000:]}")
                    return 1
                try:
                    if _request(f"{url}/v2/health/ready")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            status, body = _request(f"{url}/openai/v1/completions", {
                "model": name, "prompt": sample["prompt"], "max_tokens": 16, "temperature": 0})
        finally:
            server.terminate()
            server.wait(timeout=30)
    if status != 200:
        print(f"kubetune serve answered {status}: {body}")
        return 1
    answer = body["choices"][0]["text"]
    verdict = "right" if expected is not None and answer.strip() == str(expected).strip() else "not the reference"
    print(f"Served {name} ({metrics['type']}, {metrics['method']}) with kubetune serve at {url}")
    print(f"    POST /openai/v1/completions  prompt: {sample['prompt']!r}")
    print(f"    answer:    {answer!r}  ({verdict})")
    if expected is not None:
        print(f"    reference: {expected!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubetune_serve.demo", description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path, help="a run's output folder, runs/<job>")
    p.add_argument("--stage", default=None, help="serve this stage (default: the last one with a held-out sample)")
    args = p.parse_args(argv)
    return ask(args.output, args.stage)


if __name__ == "__main__":
    sys.exit(main())
