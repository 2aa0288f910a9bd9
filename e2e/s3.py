"""A real S3 server for the tests: SeaweedFS (`weed mini`: master, volume server, filer and S3
gateway in one process), built from its Go module by e2e/cluster/build like the control plane and
started on free ports in a folder of its own. Its one identity's keys are random per session, so a
test can look for them in logs and status and know any hit is a leak.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BUCKET = "kubetune-e2e"


@dataclass
class SeaweedFS:
    binary: Path
    root: Path
    access_key: str = field(default_factory=lambda: "KT" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    region: str = "us-east-1"
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client (the trainer, fsspec, the kubetune-storage Secret) needs."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": self.region}

    def start(self, timeout: float = 120) -> None:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "kubetune", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        from e2e.conftest import free_port

        ports: set[int] = set()
        while len(ports) < 10:
            ports.add(free_port())
        parts = ("master", "volume", "filer", "s3", "admin")  # each an HTTP and a gRPC port of its own
        port = dict(zip([f"{p}.port{g}" for p in parts for g in ("", ".grpc")], sorted(ports), strict=True))
        self.port = port["s3.port"]
        args = [str(self.binary), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *[f"-{flag}={number}" for flag, number in port.items()], "-admin.port.legacy=0",
                f"-s3.config={config}", f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._bucket_ready():
            if self.proc.poll() is not None:
                pytest.fail(f"SeaweedFS exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"SeaweedFS did not serve bucket {BUCKET} within {timeout:.0f}s: "
                            f"{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def _bucket_ready(self) -> bool:
        try:
            return bool(self.fs().exists(BUCKET))
        except Exception:  # not listening yet, or the filer not up behind the gateway
            return False

    def fs(self) -> Any:
        """An fsspec S3 filesystem on this server, with its keys (not the process environment's)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                 client_kwargs={"region_name": self.region}, skip_instance_cache=True)

    def keys(self, prefix: str) -> list[str]:
        """Every object under s3://<prefix>, relative to it."""
        fs = self.fs()
        root = prefix.removeprefix("s3://").rstrip("/")
        return sorted(k[len(root) + 1:] for k in fs.find(root))

    def stop(self) -> None:
        from e2e.conftest import stop_group

        stop_group(self.proc)
