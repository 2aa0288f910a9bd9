"""Read a running stage's progress from the trainer's Prometheus endpoint.

The trainer (rank 0, on the master pod) serves `kubetune_trainer_*` gauges on the StageRun's
metricsPort (see kubetune_trainer/callbacks.py). While a stage runs, the operator GETs
`http://<master pod IP>:<port>/metrics` and copies step, total steps, the last figures, the
tokens or samples trained and the newest complete checkpoint's step into the stage's status. An endpoint that cannot be reached (the pod starting, a network policy,
KWOK's fake pods) only means no progress this time.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "kubetune_trainer_"
# Gauges copied into status.stages[].metrics, under these keys.
FIGURES = {
    "loss": "loss",
    "learning_rate": "learningRate",
    "epoch": "epoch",
    "tokens_per_second": "tokensPerSecond",
    "samples_per_second": "samplesPerSecond",
    "gpu_memory_bytes": "gpuMemoryBytes",
}


# Counts kept as they are (`-1`, or no gauge: none yet).
COUNTS = {"tokens_trained": "tokens", "samples_trained": "samples", "checkpoint_step": "checkpoint_step"}


@dataclass
class TrainerProgress:
    step: int | None = None
    total_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int | None = None  # tokens trained so far (a resumed run restores the count)
    samples: int | None = None  # samples trained so far
    checkpoint_step: int | None = None  # the newest complete checkpoint's step; None: none yet

    @property
    def percent(self) -> int | None:
        if self.step is None or not self.total_steps:
            return None
        return max(0, min(100, int(100 * self.step / self.total_steps)))


def parse(text: str) -> TrainerProgress:
    """Progress from the text exposition format of the trainer's endpoint."""
    out = TrainerProgress()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX) or not family.samples:
            continue
        name = family.name.removeprefix(PREFIX)
        value = family.samples[0].value
        if name == "step":
            out.step = int(value)
        elif name == "total_steps":
            out.total_steps = int(value)
        elif name in FIGURES and value == value:  # skip NaN
            out.metrics[FIGURES[name]] = round(float(value), 6)
        elif name in COUNTS and value == value and value >= 0:
            setattr(out, COUNTS[name], int(value))
    return out


def scrape(host: str, port: int, timeout: float = 1.0) -> TrainerProgress | None:
    """The trainer's progress at host:port, or None when it cannot be read."""
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:  # noqa: S310 - a pod IP, http only
            text = rsp.read(1 << 20).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    try:
        return parse(text)
    except ValueError:
        return None
