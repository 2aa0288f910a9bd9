"""python -m kubetune_trainer.demo runs/pipeline-tiny

Print what each stage of a finished pipeline learned: its held-out figure before and after
training and a sample answer, read from `<output>/<stage>/metrics.json`.

    from kubetune_trainer.demo import print_summary
    print_summary("runs/pipeline-tiny")                  # every stage found, in pipeline order
    print_summary("runs/pipeline-tiny", ["pretrain", "sft", "dpo"])
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# How each held-out figure reads, and which way is better.
FIGURES: dict[str, tuple[str, bool]] = {
    "evalLoss": ("held-out loss", False),
    "exactMatch": ("exact-match accuracy", True),
    "pairwiseAccuracy": ("pairwise accuracy", True),
    "preferenceAccuracy": ("preference accuracy", True),
    "desirableLogProb": ("log p(desirable)", True),
}


def load_stages(output: str | Path, stages: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """metrics.json of each stage (in pipeline order when the StageRuns say it), with the stage's folder."""
    root = Path(output)
    found: list[tuple[int, str, dict[str, Any]]] = []
    for metrics_file in sorted(root.glob("*/metrics.json")):
        name = metrics_file.parent.name
        if stages is not None and name not in stages:
            continue
        metrics = json.loads(metrics_file.read_text())
        index = stages.index(name) if stages is not None else _pipeline_index(metrics_file.parent)
        found.append((index, name, metrics))
    return [m for _, _, m in sorted(found, key=lambda t: (t[0], t[1]))]


def _pipeline_index(stage_dir: Path) -> int:
    for candidate in (stage_dir / "stagerun.json", stage_dir.parent / f"{stage_dir.name}.stagerun.json"):
        if candidate.is_file():
            try:
                return int(json.loads(candidate.read_text()).get("index", 0))
            except ValueError:
                break
    return int(stage_dir.stat().st_mtime)


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _answer(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_number(v)}" for k, v in value.items())
    return repr(value.strip()) if isinstance(value, str) else repr(value)


def summary_lines(stages: list[dict[str, Any]]) -> list[str]:
    lines = []
    for m in stages:
        primary = m.get("primary")
        label, higher = FIGURES.get(primary or "", (primary or "figure", True))
        before = (m.get("before") or {}).get(primary) if primary else None
        after = (m.get("after") or {}).get(primary) if primary else None
        verdict = ""
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            verdict = "better" if (after > before) == higher and after != before else "not better"
        lines.append(
            f"{m['stage']} ({m['type']}, {m['method']}): {m['globalStep']} steps, train loss {_number(m.get('trainLoss'))}; "
            f"{label} {_number(before)} -> {_number(after)} {verdict}".rstrip()
        )
        sample = m.get("sample") or {}
        if sample:
            lines.append(f"    prompt:    {sample.get('prompt')!r}")
            if "reference" in sample:
                lines.append(f"    reference: {sample['reference'].strip()!r}")
            elif "chosen" in sample:
                lines.append(f"    chosen:    {_answer(sample['chosen'])}   rejected: {_answer(sample['rejected'])}")
            lines.append(f"    before:    {_answer(sample.get('before'))}")
            lines.append(f"    after:     {_answer(sample.get('after'))}")
    return lines


def print_summary(output: str | Path, stages: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Print each stage's before/after figures and sample answer; returns the stages' metrics."""
    found = load_stages(output, stages)
    if not found:
        print(f"No finished stages under {output} (no <stage>/metrics.json yet).")
        return found
    try:
        from rich.console import Console

        console = Console(highlight=False)
        for line in summary_lines(found):
            console.print(line, markup=False, soft_wrap=True)
    except ImportError:  # rich is a kubetune dependency, but the trainer image may be slimmed
        for line in summary_lines(found):
            print(line)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(__doc__.strip().splitlines()[0])
        return 2
    return 0 if print_summary(args[0], args[1:] or None) else 1


if __name__ == "__main__":
    sys.exit(main())
