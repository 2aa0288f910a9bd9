"""Small rules the operator, the local runner and the trainer share, so each exists once.

    write_json(path, data)     atomic JSON: readers never see half a file
    die_with_parent(signal)    the kernel signals this process when its parent dies
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux PR_SET_PDEATHSIG).

    Returns False when the parent is already gone (it died before the request took effect), so
    the caller can exit itself. Elsewhere than Linux it does nothing and returns True.
    """
    if sys.platform != "linux":
        return True
    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    return os.getppid() == parent
