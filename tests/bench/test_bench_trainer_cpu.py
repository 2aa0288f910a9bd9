"""The trainer benchmark (bench/trainer_cpu.py) at its --tiny size, so it cannot rot: the base model,
both sides with and without packing, every figure, and its section of docs/benchmarks.md written in
place of the old one, the other sections left as they were."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from bench import trainer_cpu

OTHERS = ("# Benchmarks\n\n## Operator scale\n\n| figures | 1 |\n\n"
          "## Operator scale: what the figures say\n\nWritten by hand.\n\n")


@pytest.mark.slow
def test_the_trainer_benchmark_measures_every_figure_and_writes_its_section_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "benchmarks.md"
    report.write_text(OTHERS + "## Trainer on CPU\n\nstale figures\n\n## Later section\n\nkept\n")

    assert trainer_cpu.main(["--tiny", "--json", "--write", str(report)]) == 0

    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    runs = summary["runs"]
    assert [(r["side"], r["packing"]) for r in runs] == [
        ("kubetune", False), ("plain TRL", False), ("kubetune", True), ("plain TRL", True)]
    for r in runs:
        for figure in ("wall_seconds", "train_seconds", "tokens", "tokens_per_second", "peak_rss_mib",
                       "largest_rss_mib", "loss"):
            assert math.isfinite(r[figure]) and r[figure] > 0, (r["side"], r["packing"], figure)
        assert r["wall_seconds"] > r["train_seconds"]
        assert r["peak_rss_mib"] >= r["largest_rss_mib"] > 100  # torch alone is more
    for ratio in (*summary["overhead"].values(), *summary["throughput"].values(), *summary["packingSpeedup"].values()):
        assert math.isfinite(ratio) and ratio > 0
    kubetune_off, plain_off, kubetune_on, plain_on = runs
    # the same training on both sides: the same tokens and the same loss
    assert kubetune_off["tokens"] == plain_off["tokens"] and kubetune_on["tokens"] == plain_on["tokens"]
    assert kubetune_off["loss"] == pytest.approx(plain_off["loss"], rel=1e-3)
    assert kubetune_on["loss"] == pytest.approx(plain_on["loss"], rel=1e-3)
    assert kubetune_on["tokens"] > kubetune_off["tokens"]  # packing fills the rows

    text = report.read_text()
    assert text.startswith(OTHERS) and text.endswith("## Later section\n\nkept\n")
    assert text.count("## Trainer on CPU") == 1 and "stale figures" not in text
    assert "python -m bench.trainer_cpu --tiny --write" in text
    for label in ("Process wall time (s)", "Training loop (s)", "Tokens/s", "Peak RSS, process tree (MiB)",
                  "Train loss at the last step", "Runner overhead", "Throughput: kubetune"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
        assert len(re.findall(r"\| [+-]?[\d,]+(\.\d+)? ", row + " ")) >= 2, row
