"""uri <-> local path: where a StageRun's models and data live on this machine or pod.

    file:///abs/path      the path itself
    file://rel/path       relative to $KUBETUNE_BASE_DIR (the manifest's folder in `kubetune run`)
    pvc://claim/path      $KUBETUNE_PVC_ROOT/claim/path (the operator mounts claims there)
    s3://bucket/key       fetched with fsspec (s3fs) into $KUBETUNE_CACHE/s3/, written back on upload
    hf://org/name         a Hugging Face hub id, resolved from the local cache (HF_HUB_OFFLINE=1 works)
    /abs or rel path      the path itself

s3 credentials and the endpoint come from the AWS_* variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION: the `kubetune-storage` Secret on the
cluster, the environment under `kubetune run`); nothing here logs them. An s3 input is cached under
a key made of its listing (keys, sizes, ETags), so a changed object is fetched again, and it is
fetched into a `.partial` folder renamed when whole, so a download cut short is never taken for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
BASE_DIR_ENV = "KUBETUNE_BASE_DIR"
STAGING_DIR_ENV = "KUBETUNE_STAGING_DIR"


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ""


def _cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def local_path(uri: str) -> Path:
    """The local path a uri is read from or written to (s3 objects are fetched first)."""
    kind = scheme(uri)
    rest = uri.split("://", 1)[1] if kind else uri
    if kind == "file" or kind == "":
        p = Path(rest)
        if not p.is_absolute():
            p = Path(os.environ.get(BASE_DIR_ENV, ".")) / p
        return p.resolve()
    if kind == "pvc":
        return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / rest
    if kind == "s3":
        return _fetch(uri)
    if kind == "hf":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(rest))
    raise ValueError(f"unsupported uri scheme {kind!r} in {uri!r}; use file://, pvc://, s3:// or hf://")


def output_path(uri: str) -> Path:
    """Where to write an output uri locally. An s3 output is staged in $KUBETUNE_STAGING_DIR (what
    `kubetune run` sets: runs/<job>/<stage>, so progress and metrics are where a file output's are),
    else in the cache, and put on s3 by CheckpointUpload (checkpoints) and `upload` (the rest)."""
    if scheme(uri) == "s3":
        staging = os.environ.get(STAGING_DIR_ENV)
        p = Path(staging) if staging else _cache_root() / "s3-out" / uri.split("://", 1)[1]
    else:
        p = local_path(uri)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _s3() -> Any:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()  # fsspec shares one instance per process: list what is there now
    return fs


def list_keys(uri: str) -> list[str]:
    """The keys under an s3 prefix, relative to it ("a/b.json"); [] when there are none."""
    fs = _s3()
    root = uri.split("://", 1)[1].rstrip("/")
    return sorted(k[len(root) + 1:] for k in fs.find(root) if k.startswith(root + "/"))


def _fetch(uri: str) -> Path:
    fs = _s3()
    rest = uri.split("://", 1)[1].rstrip("/")
    found: dict[str, Any] = fs.find(rest, detail=True)
    if not found:
        raise FileNotFoundError(f"{uri}: no such object or prefix (check the bucket, the key and AWS_ENDPOINT_URL)")
    listing = sorted((k, v.get("size"), v.get("ETag")) for k, v in found.items())
    target = _cache_root() / "s3" / hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16] / rest
    if not target.exists():  # one object is the file itself; a prefix, a folder of its objects
        _download(fs, target, {k: "" if k == rest else k[len(rest) + 1:] for k in found})
    return target


def get(uri: str, local: Path) -> None:
    """Copy every object under an s3 prefix into the folder `local`."""
    _download(_s3(), local, {f"{uri.split('://', 1)[1].rstrip('/')}/{k}": k for k in list_keys(uri)})


def _download(fs: Any, top: Path, files: dict[str, str]) -> None:
    """Fetch objects (key -> path relative to `top`, "" for `top` itself) into `<top>.partial`,
    renamed to `top` once every one is whole."""
    partial = top.with_name(top.name + ".partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    partial.unlink(missing_ok=True)
    for key, relative in files.items():
        local = partial / relative if relative else partial
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(local))
    partial.rename(top)


def put(local: Path, uri: str, skip: tuple[str, ...] = ()) -> None:
    """Put a file, or every file under a folder but the top-level names in `skip`, at `uri`."""
    fs = _s3()
    if local.is_file():
        fs.put_file(str(local), uri)
        return
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        relative = path.relative_to(local)
        if relative.parts[0] not in skip:
            fs.put_file(str(path), f"{uri.rstrip('/')}/{relative.as_posix()}")


def upload(local: Path, uri: str, skip: tuple[str, ...] = ()) -> None:
    """Publish a finished local output folder to its uri (a no-op unless the uri is remote)."""
    if scheme(uri) == "s3":
        put(local, uri, skip)
