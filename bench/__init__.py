"""kubetune's benchmarks (`make bench`): each script prints its figures and writes its own section of
docs/benchmarks.md (`write_section`), leaving the others as they are."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

HEADER = "# Benchmarks\n\nFigures of `make bench`, each section written by its script.\n"


def write_section(path: Path, text: str) -> None:
    """Put `text`, a section that starts with its `## ` title line, in place of the section of that
    title in `path` (up to the next `## ` title), or at the end; create the file when it is missing."""
    title = text.split("\n", 1)[0]
    assert title.startswith("## "), title
    old = path.read_text() if path.exists() else HEADER
    new = text.rstrip("\n") + "\n"
    m = re.search(rf"^{re.escape(title)}\n", old, flags=re.M)
    if m is None:
        path.write_text(old.rstrip("\n") + "\n\n" + new)
        return
    end = old.find("\n## ", m.start())
    path.write_text(old[:m.start()] + new + (old[end:] if end >= 0 else ""))


def machine() -> str:
    """This machine in words: cores, processor, memory, Python."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    gib = f", {int(mem.group(1)) / 2**20:.0f} GiB memory" if mem else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){gib}, Python {platform.python_version()}"
