"""The GPU benchmark (bench/gpu.py) at its tiny size on CPU, so it cannot rot where no GPU is lent:
every case runs (plain TRL, kubetune, kubetune's fast path; SFT and DPO), kubetune with the fast
path off computes plain TRL's losses step for step, and its section of docs/benchmarks.md is
written once. On CPU the SFT cases train LoRA in fp32 (QLoRA needs the GPU) and the fast path is
fused AdamW alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gpu


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_case_at_the_tiny_size(tmp_path: Path) -> None:
    s = gpu.Settings(size="tiny", steps=3, seq=64, batch_size=2, logging_steps=1)

    results, parameters = gpu.measure(s, ["sft", "dpo"], tmp_path / "work")

    assert [(r.stage, r.side) for r in results] == gpu.CASES
    by = {(r.stage, r.side): r for r in results}
    for r in results:
        assert r.tokens > 0 and r.train_seconds > 0 and sorted(r.losses) == [1, 2, 3], r
    for stage in ("sft", "dpo"):
        plain, kubetune, fast = (by[(stage, side)] for side in ("plain TRL", "kubetune", "kubetune fast"))
        assert kubetune.tokens == plain.tokens  # the same batches
        for step, loss in plain.losses.items():  # the same computation, step for step
            assert kubetune.losses[step] == pytest.approx(loss, abs=1e-4), (stage, step)
        assert kubetune.fast_path == {"fusedAdamW": False, "liger": False, "flashAttention": False, "packing": False}
        assert fast.fast_path == {"fusedAdamW": True, "liger": False, "flashAttention": False, "packing": False}
    assert 10_000 < parameters < 1_000_000

    text = gpu.table(results, parameters, peak=None)
    assert text.count("\n| sft |") == 3 and text.count("\n| dpo |") == 3
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\n## Trainer on one GPU\n\nstale\n\n## Later\n\nkept\n")
    gpu.write_section(report, f"{gpu.SECTION}\n\n{text}\n")
    written = report.read_text()
    assert written.count(gpu.SECTION) == 1 and "stale" not in written and "## Later\n\nkept" in written
