"""What the serving tests share: a server (`kubetune serve`, vLLM, kubetune-serve) started as its own process on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """`cmd(port)` on a free port, in a session of its own so that the server's children (vLLM's
    engine) stop with it; `ready` is the path that answers 200 once it serves."""

    def __init__(self, cmd: Callable[[int], list[str]], *, log: Path, ready: str,
                 env: dict[str, str] | None = None, http_timeout: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.ready = ready
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd(self.port), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.http = httpx.Client(base_url=self.url, timeout=http_timeout)

    def wait_ready(self, timeout: float = 180) -> float:
        """Wait up to `timeout` s for `ready` to answer 200; the seconds since the start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.proc.args[0]} exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if self.http.get(self.ready).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.proc.args[0]} not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        self.http.close()
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


class Server(Process):
    """`kubetune serve ARGS` on a free port, in its own process."""

    def __init__(self, *args: str, log: Path) -> None:
        super().__init__(lambda port: [sys.executable, "-m", "kubetune.cli", "serve", *args, "--port", str(port)],
                         log=log, ready="/v2/health/ready", env={**os.environ, "OMP_NUM_THREADS": "1"})
