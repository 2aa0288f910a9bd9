"""uri <-> local path: where a StageRun's models and data live on this machine or pod.

    file:///abs/path      the path itself
    file://rel/path       relative to $KUBETUNE_BASE_DIR (the manifest's folder in `kubetune run`)
    pvc://claim/path      $KUBETUNE_PVC_ROOT/claim/path (the operator mounts claims there)
    s3://bucket/key       fetched with fsspec (s3fs) into $KUBETUNE_CACHE/s3/, written back on upload
    hf://org/name         a Hugging Face hub id, resolved from the local cache (HF_HUB_OFFLINE=1 works)
    /abs or rel path      the path itself
"""

from __future__ import annotations

import os
from pathlib import Path

PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
BASE_DIR_ENV = "KUBETUNE_BASE_DIR"


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
        target = _cache_root() / "s3" / rest
        if not target.exists():
            import fsspec

            fs = fsspec.filesystem("s3")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get(uri, str(target), recursive=fs.isdir(uri))
        return target
    if kind == "hf":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(rest))
    raise ValueError(f"unsupported uri scheme {kind!r} in {uri!r}; use file://, pvc://, s3:// or hf://")


def output_path(uri: str) -> Path:
    """Where to write an output uri locally; s3 outputs are staged in the cache and uploaded by `upload`."""
    if scheme(uri) == "s3":
        p = _cache_root() / "s3-out" / uri.split("://", 1)[1]
    else:
        p = local_path(uri)
    p.mkdir(parents=True, exist_ok=True)
    return p


def upload(local: Path, uri: str) -> None:
    """Publish a finished local output folder to its uri (a no-op unless the uri is remote)."""
    if scheme(uri) != "s3":
        return
    import fsspec

    fsspec.filesystem("s3").put(str(local), uri, recursive=True)

