"""Helpers of the trainer tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from kubetune.api import StageRun

# The tiny model every test starts from: about 150k parameters, a 400-token BPE vocabulary.
TINY_INIT = {
    "architecture": "llama", "hiddenSize": 64, "numLayers": 2, "numHeads": 4,
    "maxPositionEmbeddings": 128, "tokenizer": {"train": {"vocabSize": 400}},
}
# Short sequences: the synthetic puzzles are under 20 tokens, corpus rows are cut at 64.
FAST = {"maxLength": 32, "loggingSteps": 10, "saveSteps": 100000, "batchSize": 16}

# Whisper built from scratch (tests/conftest.py's `whisper`): 2 encoder and 2 decoder blocks of width 64 hearing
# a 3-second window (the generated clips are at most 2.2 s), its tokenizer trained on the transcripts.
WHISPER = {"architecture": "whisper", "hiddenSize": 64, "numLayers": 2, "numHeads": 4, "windowSeconds": 3,
           "maxPositionEmbeddings": 64}
WHISPER_STEPS = 1500
SPEECH_HP = {"batchSize": 16, "loggingSteps": 50, "saveSteps": 100000, "warmupRatio": 0.1, "lrSchedulerType": "cosine"}


class Trainer:
    """Builds StageRuns over the synthetic data and runs kubetune-train on them."""

    def __init__(self, data: dict[str, Path], root: Path) -> None:
        self.data = data
        self.root = root

    def stage_run(
        self, name: str, type: str, fmt: str, data: str, hp: dict[str, Any] | None = None,
        model: str | Path | None = None, init: dict[str, Any] | None = None, out: Path | None = None,
        validation: bool = True, **extra: Any,
    ) -> dict[str, Any]:
        out = out or self.root / name
        run: dict[str, Any] = {
            "job": "test", "stage": name, "type": type, "index": 0, "stageCount": 1,
            "dataset": {"uri": str(self.data[f"{data}/train"]), "format": fmt},
            "tuning": {"method": "full"},
            "hyperparameters": {**FAST, **(hp or {})},
            "distributed": {},
            "outputUri": str(out),
            "metricsPort": 0,
            **extra,
        }
        if validation and f"{data}/validation" in self.data:
            run["dataset"]["validationUri"] = str(self.data[f"{data}/validation"])
        if model is not None:
            run["modelUri"] = str(model)
            if type in ("dpo", "kto"):
                run["referenceModelUri"] = str(model)
        if init is not None:
            run["modelInit"] = init
        StageRun.model_validate(run)  # the tests write only StageRuns the operator could
        return run

    def write(self, run: dict[str, Any]) -> Path:
        out = Path(run["outputUri"])
        path = out.parent / f"{out.name}.stagerun.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run))
        return path

    def run(self, run: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """kubetune-train in this process; (exit code, metrics.json or None)."""
        from kubetune_trainer import launch

        code = launch.main([str(self.write(run))])
        metrics = Path(run["outputUri"]) / "metrics.json"
        return code, json.loads(metrics.read_text()) if metrics.exists() else None

    def train(self, run: dict[str, Any]) -> dict[str, Any]:
        code, metrics = self.run(run)
        assert code == 0, (Path(run["outputUri"]) / "error.txt").read_text()
        assert metrics is not None
        return metrics

    def command(self, run: dict[str, Any], nproc: int | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "kubetune_trainer.launch", str(self.write(run))]
        if nproc:
            cmd[3:3] = ["--nproc-per-node", str(nproc)]
        return cmd

    def subprocess(self, run: dict[str, Any], nproc: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("LOCAL_RANK", None)
        return subprocess.run(self.command(run, nproc), env=env, capture_output=True, text=True, timeout=timeout)


def report(title: str, metrics: dict[str, Any]) -> None:
    """Print a learning proof's figures (pytest -s, or the -rA summary, shows them)."""
    print(f"\n{title}: before={metrics['before']} after={metrics['after']} "
          f"trainLoss={metrics['trainLoss']} steps={metrics['globalStep']} sample={metrics['sample']}")


def run_example(example: str, folder: Path) -> float:
    """`kubetune run <example>.yaml` as a user runs it: examples/<example>.yaml copied into `folder`, which holds
    the generated data/ it reads (relative to the file), writing runs/<job>/<stage> there. Returns the CPU
    seconds it took."""
    import resource
    import shutil

    shutil.copy(Path(__file__).resolve().parents[2] / "examples" / f"{example}.yaml", folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", f"{example}.yaml"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in a folder."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --- image files for the data tests ---------------------------------------------------------


def png(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 6) -> Path:
    """A small one-colour PNG at `path` (folders made)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5, 5), colour).save(buf, format="PNG")
    return buf.getvalue()


def jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)

