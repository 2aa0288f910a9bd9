"""The trainer on CPU: `kubetune run` of an SFT stage against the same training as a plain TRL script.

    .venv/bin/python -m bench.trainer_cpu [--steps 100] [--repeat 3] [--threads 1] [--write docs/benchmarks.md]

In a temporary folder: the letter puzzles of kubetune_trainer.data.synthetic made few-shot (each
row's prompt holds 0 to `max_shots` solved puzzles before its own, so the rows' lengths spread as
real SFT data's do, from about 10 to 50 tokens: what padding wastes and packing saves; the plain
puzzles are all about 11 tokens long, and packing them saved nothing: 0.96x), promptCompletion,
and one base model both sides start from, a llama pretrained from `model.init`
by `kubetune run` (not measured). Then, packing off and on, `repeat` times, one process at a time,
each with the same OMP/MKL threads:
1. kubetune: `kubetune run` of a FineTuneJob with one sft stage (full fine-tuning of the base);
2. plain TRL: `python -m bench.trainer_cpu --plain ...`, the same training written with
   `trl.SFTTrainer` and `SFTConfig` alone (no kubetune import): the settings kubetune's recipe
   (recipes/sft.py, common.training_args) gives TRL, the same model folder, rows, steps and seed.
Figures per run: the process's wall seconds; its training loop's seconds and the tokens it trained
(TRL's `num_tokens`: the tokens in the batches, padding left out), read on both sides from the same
place, the final checkpoint's trainer_state.json (its last log, at the last step, before that
checkpoint is written); tokens/s; peak RSS of the process tree and of its largest process; the loss
logged at the last step (equal on both sides: the same training); the CPU other processes used
meanwhile. Each figure is the best of the `repeat` runs (see Figures.get). Ratios: runner overhead
(kubetune wall / plain wall; goal <= 1.10), throughput (kubetune tokens/s / plain tokens/s; goal
>= 1.0) and the packing speed-up (tokens/s with packing / without).

One thread by default: on 2 cores that another process shares, two OMP threads wait on each other
whenever that process takes a core (the training loop ran up to 5x slower so), while one thread
keeps the other core and loses a few percent. `--threads 2` on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Trainer on CPU"
SIDES = ("kubetune", "plain TRL")


@dataclass(frozen=True)
class Settings:
    """What both sides train: the base model's size and the SFT stage's hyperparameters."""

    steps: int = 100                # SFT optimizer steps, a multiple of logging_steps
    batch_size: int = 16
    max_length: int = 64
    learning_rate: float = 1e-3
    seed: int = 42
    logging_steps: int = 5          # kubetune's default (hyperparameters.loggingSteps)
    threads: int = 1                # OMP_NUM_THREADS and MKL_NUM_THREADS of every process
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 128
    vocab_size: int = 512
    pretrain_steps: int = 30        # of the base model (not measured)
    train_rows: int = 2000          # rows per generated file
    repeat: int = 3                 # runs of each side and packing; the figures are the best
    max_shots: int = 3              # solved puzzles before each row's own: 0 to max_shots, uniformly


TINY = Settings(steps=5, batch_size=4, max_length=32, threads=1, hidden_size=32, num_layers=1, num_heads=2,
                max_positions=64, vocab_size=300, pretrain_steps=5, train_rows=200, repeat=1, max_shots=2)
SFT_DATA = "fewshot.jsonl"  # in the data folder, written by few_shot


@dataclass
class Run:
    """One measured process."""

    side: str                # "kubetune" or "plain TRL"
    packing: bool
    wall_seconds: float      # the whole process, start to exit
    train_seconds: float     # the training loop (the Trainer's train_runtime at the last step)
    tokens: int              # tokens trained (TRL's num_tokens)
    peak_rss_mib: float      # the process tree, summed
    largest_rss_mib: float   # its largest process
    loss: float              # logged at the last step
    other_cpu: float         # CPU other processes used meanwhile, as a share of the machine's

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds


@dataclass
class Figures:
    settings: Settings
    runs: list[Run] = field(default_factory=list)
    base_seconds: float = 0.0  # `kubetune run` of the base model's pretraining

    def get(self, side: str, packing: bool) -> Run:
        """The best of the side's runs with or without packing: the least wall time, the least training
        loop (and its tokens and loss), the largest RSS; the median share of other processes' CPU. On a
        shared machine other work only ever adds time, so the least is the closest to the cost itself."""
        runs = [r for r in self.runs if r.side == side and r.packing == packing]
        fastest = min(runs, key=lambda r: r.train_seconds)
        return Run(side, packing, min(r.wall_seconds for r in runs), fastest.train_seconds, fastest.tokens,
                   max(r.peak_rss_mib for r in runs), max(r.largest_rss_mib for r in runs), fastest.loss,
                   statistics.median(r.other_cpu for r in runs))

    def overhead(self, packing: bool) -> float:
        return self.get("kubetune", packing).wall_seconds / self.get("plain TRL", packing).wall_seconds

    def throughput(self, packing: bool) -> float:
        return self.get("kubetune", packing).tokens_per_second / self.get("plain TRL", packing).tokens_per_second

    def packing_speedup(self, side: str) -> float:
        return self.get(side, True).tokens_per_second / self.get(side, False).tokens_per_second

    def summary(self) -> dict[str, Any]:
        """The figures (Figures.get's) and ratios, and every run, as --json prints them."""
        return {
            "settings": asdict(self.settings),
            "baseSeconds": self.base_seconds,
            "runs": [{**asdict(r), "tokens_per_second": r.tokens_per_second}
                     for r in (self.get(side, p) for p in (False, True) for side in SIDES)],
            "overhead": {"packingOff": self.overhead(False), "packingOn": self.overhead(True)},
            "throughput": {"packingOff": self.throughput(False), "packingOn": self.throughput(True)},
            "packingSpeedup": {side: self.packing_speedup(side) for side in SIDES},
            "allRuns": [asdict(r) for r in self.runs],
        }


# --- the two sides --------------------------------------------------------------------------


def kubetune_cmd() -> list[str]:
    script = Path(sys.executable).parent / "kubetune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kubetune.cli"]


def pretrain_manifest(s: Settings, data: Path) -> dict[str, Any]:
    """The base model: a llama from model.init, its tokenizer trained on the corpus."""
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench-base"},
        "spec": {
            "model": {"init": {"architecture": "llama", "hiddenSize": s.hidden_size, "numLayers": s.num_layers,
                               "numHeads": s.num_heads, "maxPositionEmbeddings": s.max_positions,
                               "tokenizer": {"train": {"vocabSize": s.vocab_size}}}},
            "stages": [{
                "name": "pretrain", "type": "pretrain",
                "dataset": {"uri": f"file://{data / 'pretrain' / 'train.jsonl'}", "format": "text"},
                "hyperparameters": {"maxSteps": s.pretrain_steps, "learningRate": 3e-3, "batchSize": 16,
                                    "maxLength": min(64, s.max_positions), "saveSteps": s.pretrain_steps},
                "resources": {"gpusPerNode": 0},
            }],
        },
    }


def sft_manifest(s: Settings, base: Path, data: Path, packing: bool) -> dict[str, Any]:
    """One sft stage, full fine-tuning of the base; one checkpoint, at the last step."""
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "bench-sft-packing" if packing else "bench-sft"},
        "spec": {
            "model": {"uri": f"file://{base}"},
            "stages": [{
                "name": "sft", "type": "sft",
                "dataset": {"uri": f"file://{data / SFT_DATA}", "format": "promptCompletion"},
                "tuning": {"method": "full"},
                "hyperparameters": {"maxSteps": s.steps, "batchSize": s.batch_size, "maxLength": s.max_length,
                                    "learningRate": s.learning_rate, "seed": s.seed, "packing": packing,
                                    "saveSteps": s.steps, "loggingSteps": s.logging_steps},
                "resources": {"gpusPerNode": 0},
            }],
        },
    }


def plain_cmd(s: Settings, base: Path, data: Path, out: Path, packing: bool) -> list[str]:
    return [sys.executable, "-m", "bench.trainer_cpu", "--plain", "--model", str(base),
            "--data", str(data / SFT_DATA), "--out", str(out), "--settings", json.dumps(asdict(s)),
            *(["--packing"] if packing else [])]


def plain(model_dir: str, data: str, out: str, s: Settings, packing: bool) -> None:
    """The same SFT as kubetune's recipe, written with TRL alone: every SFTConfig value is what
    common.training_args and recipes/sft.py give it for the bench's stage (promptCompletion rows,
    full fine-tuning, fp32 on CPU, the loss on completions only)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(s.seed)
    with open(data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=out, num_train_epochs=1.0, max_steps=s.steps, learning_rate=s.learning_rate,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=1, warmup_steps=0.0, weight_decay=0.0, lr_scheduler_type="linear",
        seed=s.seed, data_seed=s.seed, save_strategy="steps", save_steps=s.steps, save_total_limit=2,
        logging_strategy="steps", logging_steps=s.logging_steps, logging_first_step=True,
        activation_checkpointing=False, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        report_to="none", disable_tqdm=True, include_num_input_tokens_seen="all", ddp_find_unused_parameters=False,
        dataloader_num_workers=0, eval_strategy="no",
        max_length=s.max_length, packing=packing, completion_only_loss=True, assistant_only_loss=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out)
    tokenizer.save_pretrained(out)


def few_shot(rows: list[dict[str, Any]], max_shots: int, seed: int) -> list[dict[str, Any]]:
    """Each promptCompletion row behind 0 to `max_shots` other rows, solved ("prompt completion"),
    one a line: the same task and loss (on the row's own completion), lengths that spread."""
    import random

    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        shots = [rows[j] for j in rng.sample([j for j in range(len(rows)) if j != i], rng.randint(0, max_shots))]
        context = "".join(f"{shot['prompt']}{shot['completion']}\n" for shot in shots)
        out.append({"prompt": context + row["prompt"], "completion": row["completion"]})
    return out


# --- measuring a process --------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except (OSError, ValueError):
                pass
    return pids


def _high_water_kib(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), 0 when it is gone."""
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), flags=re.M)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


@dataclass
class Process:
    wall_seconds: float
    peak_rss_mib: float
    largest_rss_mib: float
    other_cpu: float


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measured(cmd: list[str], env: dict[str, str], log: Path) -> Process:
    """Run `cmd` to its end: its wall seconds, the peak RSS of its process tree and of its largest
    process, and the share of the machine's CPU that other processes used meanwhile.

    The tree's RSS: the sum of each process's own peak (VmHWM, read every 0.1 s while it lives; an
    upper bound, as the peaks need not coincide), the largest process's taken from the kernel at
    exit (wait4's ru_maxrss), which also holds what grew after the last read. Other processes'
    CPU: the machine's busy time less the tree's CPU time and this process's own."""
    with log.open("w") as out:
        busy, own = _busy_seconds(), time.process_time()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        peaks: dict[int, int] = {}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for p in _tree(proc.pid):
                peaks[p] = max(peaks.get(p, 0), _high_water_kib(p))
            time.sleep(0.1)
        wall = time.monotonic() - start
        other = _busy_seconds() - busy - (time.process_time() - own) - usage.ru_utime - usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited with {proc.returncode}; {log}:\n{tail}")
    largest = max([usage.ru_maxrss, *peaks.values()])
    tree = largest + sum(peaks.values()) - max(peaks.values(), default=0)
    return Process(wall, tree / 1024, largest / 1024, max(other, 0.0) / (wall * (os.cpu_count() or 1)))


def trained(out: Path, steps: int) -> tuple[float, int, float]:
    """(train-loop seconds, tokens trained, loss) at the last step, from the final checkpoint's trainer_state.json."""
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    last = next(e for e in reversed(state["log_history"]) if "loss" in e)
    if last["step"] != steps or "train_runtime" not in last or "num_tokens" not in last:
        raise RuntimeError(f"{out}: no log with train_runtime and num_tokens at step {steps}: {last}")
    return float(last["train_runtime"]), int(last["num_tokens"]), float(last["loss"])


def environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def write_yaml(path: Path, manifest: dict[str, Any]) -> Path:
    path.write_text(json.dumps(manifest, indent=2))  # JSON is YAML
    return path


# --- the bench ------------------------------------------------------------------------------


def run(s: Settings, work: Path, log: Callable[[str], None] = print) -> Figures:
    """Every run of the bench in `work`; the figures."""
    from kubetune_trainer.data.synthetic import make_all

    if s.steps % s.logging_steps:
        raise ValueError(f"steps ({s.steps}) must be a multiple of logging_steps ({s.logging_steps})")
    env = environment(s.threads)
    data, runs_dir = work / "data", work / "runs"
    make_all(data, seed=0, n_train=s.train_rows, n_val=20)
    with open(data / "sft" / "train.jsonl", encoding="utf-8") as f:
        rows = few_shot([json.loads(line) for line in f if line.strip()], s.max_shots, s.seed)
    (data / SFT_DATA).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    figures = Figures(s)

    log(f"Training the base model: llama hidden {s.hidden_size}, {s.num_layers} layers, {s.pretrain_steps} steps")
    start = time.monotonic()
    manifest = write_yaml(work / "base.yaml", pretrain_manifest(s, data))
    measured([*kubetune_cmd(), "run", str(manifest), "--runs-dir", str(runs_dir)], env, work / "base.log")
    figures.base_seconds = time.monotonic() - start
    base = runs_dir / "bench-base" / "pretrain"

    for i in range(s.repeat):
        for packing in (False, True):
            # the sides take turns to go first: a load that drifts weighs on both
            for side in SIDES if (i + packing) % 2 == 0 else SIDES[::-1]:
                tag = f"{'kubetune' if side == 'kubetune' else 'plain'}{'-packing' if packing else ''}-{i}"
                if side == "kubetune":
                    manifest_body = sft_manifest(s, base, data, packing)
                    job = f"{manifest_body['metadata']['name']}-{i}"
                    manifest_body["metadata"]["name"] = job
                    manifest = write_yaml(work / f"{tag}.yaml", manifest_body)
                    cmd = [*kubetune_cmd(), "run", str(manifest), "--runs-dir", str(runs_dir)]
                    out = runs_dir / job / "sft"
                else:
                    out = work / tag
                    cmd = plain_cmd(s, base, data, out, packing)
                m = measured(cmd, env, work / f"{tag}.log")
                seconds, tokens, loss = trained(out, s.steps)
                figures.runs.append(Run(side, packing, m.wall_seconds, seconds, tokens, m.peak_rss_mib,
                                        m.largest_rss_mib, loss, m.other_cpu))
                log(f"[{i + 1}/{s.repeat}] {side}, packing {'on' if packing else 'off'}: {m.wall_seconds:.1f} s, "
                    f"training loop {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s, peak RSS "
                    f"{m.peak_rss_mib:.0f} MiB, loss {loss:.4f}, other processes {m.other_cpu:.0%} of the CPU")
    return figures


# --- report ---------------------------------------------------------------------------------


def table(f: Figures) -> str:
    cols = [(side, packing) for packing in (False, True) for side in SIDES]
    rows: list[tuple[str, Callable[[Run], str]]] = [
        ("Process wall time (s)", lambda r: f"{r.wall_seconds:.1f}"),
        ("Training loop (s)", lambda r: f"{r.train_seconds:.1f}"),
        ("Outside the training loop: start-up, data, model, saving (s)",
         lambda r: f"{r.wall_seconds - r.train_seconds:.1f}"),
        ("Tokens trained", lambda r: f"{r.tokens:,.0f}"),
        ("Tokens/s (tokens / training loop)", lambda r: f"{r.tokens_per_second:,.0f}"),
        ("Peak RSS, process tree (MiB)", lambda r: f"{r.peak_rss_mib:.0f}"),
        ("Peak RSS, largest process (MiB)", lambda r: f"{r.largest_rss_mib:.0f}"),
        ("Train loss at the last step", lambda r: f"{r.loss:.4f}"),
        ("Other processes' CPU meanwhile, median (% of the machine)", lambda r: f"{r.other_cpu:.0%}"),
    ]
    head = ("| | " + " | ".join(f"{side}, packing {'on' if p else 'off'}" for side, p in cols) + " |\n|---|"
            + "---:|" * len(cols) + "\n")
    body = "".join(f"| {label} | " + " | ".join(cell(f.get(*c)) for c in cols) + " |\n" for label, cell in rows)
    def diff(p: bool, figure: str) -> float:
        return float(getattr(f.get("kubetune", p), figure) - getattr(f.get("plain TRL", p), figure))

    ratios: list[tuple[str, Callable[[bool], str]]] = [
        ("Runner overhead: kubetune wall / plain wall (goal <= 1.10)", lambda p: f"{f.overhead(p):.3f}"),
        ("kubetune wall - plain wall (s)", lambda p: f"{diff(p, 'wall_seconds'):+.1f}"),
        ("Throughput: kubetune tokens/s / plain tokens/s (goal >= 1.0)", lambda p: f"{f.throughput(p):.3f}"),
        ("Peak RSS of the tree, kubetune - plain (MiB)", lambda p: f"{diff(p, 'peak_rss_mib'):+.0f}"),
    ]
    head2 = "\n| | packing off | packing on |\n|---|---:|---:|\n"
    body2 = "".join(f"| {label} | {cell(False)} | {cell(True)} |\n" for label, cell in ratios)
    speedup = ("\nPacking speed-up (tokens/s with packing / without): kubetune "
               f"{f.packing_speedup('kubetune'):.2f}, plain TRL {f.packing_speedup('plain TRL'):.2f}.\n")
    return head + body + head2 + body2 + speedup


def notes(f: Figures) -> str:
    s = f.settings
    text = (
        f"Both sides fine-tune (full, fp32) the same base model, a llama of hidden size {s.hidden_size}, "
        f"{s.num_layers} layers, {s.num_heads} heads and a {s.vocab_size}-token BPE tokenizer pretrained "
        f"{s.pretrain_steps} steps by `kubetune run` ({f.base_seconds:.0f} s, not measured), on the "
        f"{s.train_rows} letter puzzles of kubetune_trainer.data.synthetic (sft/train.jsonl), each behind 0 to "
        f"{s.max_shots} other puzzles solved (few-shot, so the rows' lengths spread; promptCompletion, the loss "
        f"on completions only): {s.steps} steps of batch {s.batch_size}, maxLength {s.max_length}, "
        f"lr {s.learning_rate:g}, seed {s.seed}, one checkpoint (at the last step), {s.threads} OMP/MKL "
        f"thread(s), one process at a time, each side and packing {s.repeat} times, the best of them shown "
        "(the least wall time, the least training loop with its tokens and loss, the largest RSS). kubetune: `kubetune run` of a one-stage FineTuneJob (its process tree: "
        "the runner and the trainer it starts). Plain TRL: `python -m bench.trainer_cpu --plain`, "
        "`SFTTrainer` with the `SFTConfig` kubetune's recipe builds. Training loop: the Trainer's "
        "train_runtime at the last step's log (before the final checkpoint is written); tokens: TRL's "
        "num_tokens (padding left out). Peak RSS of the tree: the sum of its processes' own peaks (VmHWM, "
        "read every 0.1 s). Goals (issue 16): runner overhead <= 1.10, throughput >= 1.0."
    )
    return textwrap.fill(text, width=100) + "\n"


def section(f: Figures, command: str) -> str:
    return (f"{SECTION}\n\n<!-- written by bench/trainer_cpu.py -->\n"
            f"Machine: {machine()}. Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n\n"
            f"    {command}\n\n{table(f)}\n{notes(f)}")


def write(path: Path, f: Figures, command: str) -> None:
    """Replace this bench's section of `path` in place (or add it at the end; or create the file)."""
    write_section(path, section(f, command))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--steps", type=int, help=f"SFT steps per run, a multiple of 5 (default {Settings.steps})")
    p.add_argument("--repeat", type=int, help=f"runs of each side and packing, the figures the best of them "
                                              f"(default {Settings.repeat})")
    p.add_argument("--threads", type=int, help=f"OMP/MKL threads of every process (default {Settings.threads})")
    p.add_argument("--tiny", action="store_true", help="the smoke test's size: a model and a run of a few seconds")
    p.add_argument("--write", type=Path, default=None, help="write the figures into this markdown file")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # the plain-TRL side, run by the bench
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--packing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain:
        plain(args.model, args.data, args.out, Settings(**json.loads(args.settings)), args.packing)
        return 0
    given = {k: v for k, v in (("steps", args.steps), ("repeat", args.repeat), ("threads", args.threads))
             if v is not None}
    s = replace(TINY if args.tiny else Settings(), **given)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-trainer-") as work:
        figures = run(s, Path(work))
    print(table(figures), flush=True)
    if args.json:
        print(json.dumps(figures.summary(), indent=2))
    if args.write:
        flags = " --tiny" if args.tiny else ""
        flags += "".join(f" --{k} {v}" for k, v in given.items())
        write(args.write, figures, f"python -m bench.trainer_cpu{flags} --write {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
