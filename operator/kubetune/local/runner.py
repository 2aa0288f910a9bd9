"""The local runner behind `kubetune run`: a FineTuneJob on this machine, no cluster.

    kubetune run examples/pipeline-tiny.yaml [--nproc 2] [--resume]

A file may hold several FineTuneJobs (as `kubectl apply -f` takes them): they run one after
another, in file order, each in its own `<runs-dir>/<job>`; all are checked before the first starts.

Each stage is rendered into a StageRun (`<run>/<stage>/stagerun.json`, the same object the
operator puts in a ConfigMap) and run by `kubetune-train --nproc-per-node N`, which is torchrun
in-process (standalone rendezvous) so the workers' own exit codes come back. The run's state lives in `<run>/run.json`, so an interrupted run (Ctrl-C,
a kill, a crash) continues with `--resume`: finished stages are skipped and the stage that
was cut short restarts from its newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from kubetune.api import FORMAT_BY_SCHEMA, FineTuneJob, PreferenceDataset, StageData, StageStatus, render_stage_run
from kubetune.api.meta import now_rfc3339
from kubetune.api.validation import load_documents, validate_object
from kubetune.shared import die_with_parent, write_json

RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"
LOG_FILE = "train.log"
EXIT_INVALID, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class RunError(Exception):
    """A run that cannot start; the message says what to do."""


@dataclass
class Plan:
    job: FineTuneJob
    datasets: dict[str, PreferenceDataset]
    base_dir: Path


def load_plans(manifest: Path) -> list[Plan]:
    """The FineTuneJobs of a manifest file, in file order, each with the PreferenceDatasets beside them."""
    docs = load_documents(manifest)
    problems = [f"{p}" for d in docs for p in validate_object(d) if p.severity == "error"]
    if problems:
        raise RunError(f"{manifest} is invalid:\n  " + "\n  ".join(problems))
    jobs = [FineTuneJob.model_validate(d) for d in docs if d.get("kind") == "FineTuneJob"]
    if not jobs:
        raise RunError(f"{manifest} holds no FineTuneJob; add one (kind: FineTuneJob)")
    names = [j.metadata.name for j in jobs]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise RunError(f"{manifest} holds more than one FineTuneJob named {', '.join(twice)}; "
                       "each runs in runs/<name>, so give each its own metadata.name")
    datasets = {
        d["metadata"]["name"]: PreferenceDataset.model_validate(d) for d in docs if d.get("kind") == "PreferenceDataset"
    }
    return [Plan(job, datasets, manifest.resolve().parent) for job in jobs]


def load_plan(manifest: Path) -> Plan:
    """The one FineTuneJob of a manifest file."""
    plans = load_plans(manifest)
    if len(plans) != 1:
        raise RunError(f"{manifest} must hold exactly one FineTuneJob (found {len(plans)})")
    return plans[0]


def _stage_data(plan: Plan, index: int) -> StageData | None:
    ref = plan.job.spec.stages[index].dataset.preference_dataset_ref
    if ref is None:
        return None
    ds = plan.datasets.get(ref.name)
    if ds is None:
        raise RunError(
            f"spec.stages[{index}].dataset.preferenceDatasetRef: no PreferenceDataset {ref.name!r} in the manifest; "
            "add it to the same file (separated by ---) or use dataset.uri"
        )
    return StageData(
        uri=ds.spec.source.uri, format=FORMAT_BY_SCHEMA[ds.spec.schema_], columns=ds.spec.columns,
        validation_fraction=ds.spec.split.validation_fraction,
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _die_with_parent() -> None:
    """Runs in the child: if `kubetune run` is killed, torchrun gets SIGTERM and stops its workers."""
    die_with_parent(signal.SIGTERM)


def _typed(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stage entries of run.json through the FineTuneJob's StageStatus model (the CRD's schema),
    so a local run and a cluster run describe a stage with the same fields and states."""
    return [StageStatus.model_validate(e).to_wire() for e in stages]


class Runner:
    def __init__(self, manifest: Path, runs_dir: Path, nproc: int = 1, resume: bool = False,
                 metrics_port: int = 0, console: Console | None = None, plan: Plan | None = None) -> None:
        self.plan = plan or load_plan(manifest)
        self.manifest = manifest
        self.nproc = nproc
        self.metrics_port = metrics_port
        self.console = console or Console()
        job = self.plan.job
        self.run_dir = (runs_dir / job.metadata.name).resolve()
        self.output_base = job.spec.output.uri or f"file://{self.run_dir}"
        self.state = self._load_state(resume)

    def _load_state(self, resume: bool) -> dict[str, Any]:
        path = self.run_dir / RUN_FILE
        spec = self.plan.job.spec.to_wire()
        old = _read_json(path)
        if old is not None and not resume:
            raise RunError(f"{self.run_dir} holds an earlier run; pass --resume to continue it, or remove the folder")
        if old is not None:
            if old.get("spec") != spec:
                raise RunError(f"{self.manifest} changed since {self.run_dir} started; resume with the same manifest")
            return old
        if resume:
            self.console.print(f"No earlier run in {self.run_dir}; starting a new one.")
        stages = _typed([{"name": s.name, "type": s.type, "state": "Pending"} for s in self.plan.job.spec.stages])
        return {"job": self.plan.job.metadata.name, "manifest": str(self.manifest.resolve()),
                "outputBase": self.output_base, "spec": spec, "stages": stages}  # written when the run starts

    def _save(self) -> None:
        typed = _typed(self.state["stages"])
        for entry, wire in zip(self.state["stages"], typed, strict=True):  # the entries stay the same objects
            entry.clear()
            entry.update(wire)
        write_json(self.run_dir / RUN_FILE, self.state)

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._save()
        for i, entry in enumerate(self.state["stages"]):
            if entry["state"] == "Succeeded":
                self.console.print(f"Skipped stage {entry['name']}: it succeeded before.")
                continue
            code = self._run_stage(i, entry)
            if code != 0:
                return code
        self.console.print(f"[bold green]Succeeded[/]: job {self.state['job']}, outputs in {self.output_base}")
        return 0

    def _run_stage(self, index: int, entry: dict[str, Any]) -> int:
        stage_run = render_stage_run(self.plan.job, index, self.output_base, _stage_data(self.plan, index), self.metrics_port)
        stage_dir = self.run_dir / entry["name"]
        stage_dir.mkdir(parents=True, exist_ok=True)
        run_file = stage_dir / "stagerun.json"
        run_file.write_text(stage_run.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        resumed = entry["state"] != "Pending"
        entry.update(state="Running", startTime=entry.get("startTime") or now_rfc3339())
        entry.pop("message", None)
        self._save()
        self.console.print(
            f"{'Resumed' if resumed else 'Started'} stage {entry['name']} ({entry['type']}) "
            f"[{index + 1}/{len(self.state['stages'])}] nproc={self.nproc}"
        )
        # kubetune-train is the torchrun agent itself (--nproc-per-node), so workers' exit codes survive
        cmd = [sys.executable, "-m", "kubetune_trainer.launch", f"--nproc-per-node={self.nproc}", str(run_file)]
        env = {**os.environ, "KUBETUNE_BASE_DIR": str(self.plan.base_dir), "PYTHONUNBUFFERED": "1",
               "KUBETUNE_STAGING_DIR": str(stage_dir)}  # where an s3 output is written before it goes up
        with (stage_dir / LOG_FILE).open("a") as log:
            log.write(f"\n=== {now_rfc3339()} {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
            try:
                self._watch(proc, entry["name"], stage_dir / PROGRESS_FILE)
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                entry.update(state="Interrupted", message="interrupted by the user")
                self._save()
                self.console.print(f"Interrupted stage {entry['name']}; continue with: kubetune run {self.manifest} --resume")
                return EXIT_INTERRUPTED
        progress = _read_json(stage_dir / PROGRESS_FILE) or {}
        if proc.returncode != 0:
            tail = (stage_dir / LOG_FILE).read_text().splitlines()[-25:]
            entry.update(state="Failed", exitCode=proc.returncode, completionTime=now_rfc3339(),
                         message=f"kubetune-train exited with {proc.returncode}; see {stage_dir / LOG_FILE}")
            self._save()
            self.console.print("\n".join(tail), markup=False, highlight=False)
            self.console.print(f"[bold red]Failed[/] stage {entry['name']}: {entry['message']}")
            return EXIT_FAILED
        metrics = _read_json(stage_dir / "metrics.json") or {}
        entry.update(state="Succeeded", completionTime=now_rfc3339(), step=progress.get("step"),
                     outputUri=stage_run.output_uri)
        self._save()
        flat = metrics.get("metrics", {})
        figures = ", ".join(f"{k}={v:.4g}" for k, v in flat.items() if isinstance(v, (int, float)))
        self.console.print(f"Succeeded stage {entry['name']}: {figures}")
        return 0

    def _watch(self, proc: subprocess.Popen[bytes], stage: str, progress_file: Path) -> None:
        """Follow progress.json until the trainer exits: a live bar on a terminal, lines otherwise."""
        if self.console.is_terminal:
            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                       TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
            with Progress(*columns, console=self.console) as bar:
                task = bar.add_task(stage, total=None, loss="-")
                while proc.poll() is None:
                    p = _read_json(progress_file)
                    if p:
                        bar.update(task, completed=p.get("step", 0), total=p.get("totalSteps"), loss=_fmt(p.get("loss")))
                    time.sleep(0.5)
            return
        last = None
        while True:
            done = proc.poll() is not None
            p = _read_json(progress_file)
            if p and p.get("totalSteps") and p.get("step") != last:  # totalSteps is 0 until training starts
                last = p.get("step")
                eta = p.get("etaSeconds")
                self.console.print(
                    f"{stage} step {p.get('step')}/{p.get('totalSteps')} loss {_fmt(p.get('loss'))} "
                    f"eta {'-' if eta is None else f'{eta:.0f}s'}",
                    highlight=False,
                )
            if done:
                return
            time.sleep(0.5)


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def status(run_dir: Path, console: Console) -> int:
    """`kubetune status runs/<job>`: where a local run stands."""
    from rich.table import Table

    state = _read_json(run_dir / RUN_FILE)
    if state is None:
        console.print(f"{run_dir} holds no kubetune run ({RUN_FILE} is missing)")
        return EXIT_INVALID
    table = Table(title=f"FineTuneJob {state['job']}")
    for col in ("stage", "type", "state", "step", "loss", "eta", "output"):
        table.add_column(col)
    for entry in state["stages"]:
        p = _read_json(run_dir / entry["name"] / PROGRESS_FILE) or {}
        step = f"{p['step']}/{p.get('totalSteps')}" if "step" in p else "-"
        eta = p.get("etaSeconds") if entry["state"] == "Running" else None
        table.add_row(entry["name"], entry["type"], entry["state"], step, _fmt(p.get("loss")),
                      "-" if eta is None else f"{eta:.0f}s", entry.get("outputUri", "-"))
    console.print(table)
    for entry in state["stages"]:
        if entry.get("message"):
            console.print(f"{entry['name']}: {entry['message']}")
    return 0
