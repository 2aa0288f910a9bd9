"""Progress reporting: `<output>/progress.json` and the Prometheus endpoint, on rank 0.

progress.json is what the local runner and the operator read for a stage's status; it is
rewritten atomically (tmp + rename) at every logging step and checkpoint:

    {"step": 40, "totalSteps": 100, "loss": 1.83, "learningRate": 0.0002, "epoch": 0.4,
     "etaSeconds": 61.0, "tokensPerSecond": 5120.0, "state": "running",
     "lastCheckpoint": "file:///runs/demo/sft/checkpoint-40", "updatedAt": "2025-01-01T12:00:00Z"}

state is "running" while training; launch.py writes the final "succeeded" or "failed".

Metrics (labels finetunejob and stage only; `job` is Prometheus' own target label), on StageRun.metricsPort (0 turns the endpoint off):

    kubetune_trainer_step                        optimizer steps done
    kubetune_trainer_total_steps                 optimizer steps planned
    kubetune_trainer_epoch                       epochs done (fractional)
    kubetune_trainer_loss                        training loss at the last logging step
    kubetune_trainer_learning_rate               learning rate at the last logging step
    kubetune_trainer_tokens_per_second           input tokens per second since the last logging step
    kubetune_trainer_samples_per_second          examples per second since the last logging step
    kubetune_trainer_tokens_total                input tokens seen (counter)
    kubetune_trainer_tokens_trained              input tokens the model has trained on, up to the current step
    kubetune_trainer_samples_trained             examples the model has trained on, up to the current step
    kubetune_trainer_checkpoint_step             step of the newest complete checkpoint (-1: none yet)
    kubetune_trainer_gpu_memory_bytes            peak CUDA memory allocated by this process (GPU only)

tokens_trained and samples_trained are the trainer state's figures: a stage resumed from a
checkpoint starts from the checkpoint's, so steps redone after a restart are not counted twice
(tokens_total counts what this process read, redone steps included). The operator copies them
and the checkpoint (as <output>/checkpoint-<step>) into the stage's status.

RL stages (ppo, grpo) also report, at each logging step, the figures of `RL_FIGURES` (mean
reward, KL to the reference, entropy; PPO adds value loss, clip fraction and explained
variance) as `kubetune_trainer_<name>` gauges and under "rl" in progress.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from kubetune.api.meta import now_rfc3339
from kubetune.shared import write_json

from kubetune_trainer import storage
from kubetune_trainer.common import TRAINER_STATE, barrier, checkpoints, latest_checkpoint

log = logging.getLogger("kubetune_trainer")


# Trainer log key -> gauge name (kubetune_trainer_<name>) of the RL figures. The keys are what
# TRL's GRPOTrainer logs and what recipes/ppo.py logs.
RL_FIGURES: dict[str, tuple[str, str]] = {
    "reward": ("reward", "Mean reward of the sampled completions at the last logging step."),
    "kl": ("kl", "Mean KL divergence of the policy to the reference model at the last logging step."),
    "entropy": ("entropy", "Mean per-token entropy of the policy's samples at the last logging step."),
    "value_loss": ("value_loss", "PPO value-function loss at the last logging step."),
    "clip_fraction": ("clip_fraction", "Share of tokens whose policy ratio was clipped at the last logging step (PPO)."),
    "explained_variance": ("explained_variance", "How much of the returns' variance the value model explains (PPO)."),
}


class Metrics:
    """The trainer's Prometheus metrics in their own registry, served over HTTP when port > 0."""

    def __init__(self, job: str, stage: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        labels = ["finetunejob", "stage"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"kubetune_trainer_{name}", doc, labels, registry=self.registry).labels(job, stage)

        self.step = gauge("step", "Optimizer steps done.")
        self.total_steps = gauge("total_steps", "Optimizer steps planned.")
        self.epoch = gauge("epoch", "Epochs done (fractional).")
        self.loss = gauge("loss", "Training loss at the last logging step.")
        self.learning_rate = gauge("learning_rate", "Learning rate at the last logging step.")
        self.tokens_per_second = gauge("tokens_per_second", "Input tokens per second since the last logging step.")
        self.samples_per_second = gauge("samples_per_second", "Examples per second since the last logging step.")
        self.tokens = Counter(
            "kubetune_trainer_tokens", "Input tokens seen.", labels, registry=self.registry
        ).labels(job, stage)
        self.tokens_trained = gauge("tokens_trained", "Input tokens the model has trained on, up to the current step.")
        self.samples_trained = gauge("samples_trained", "Examples the model has trained on, up to the current step.")
        self.checkpoint_step = gauge("checkpoint_step", "Step of the newest complete checkpoint (-1: none yet).")
        self.checkpoint_step.set(-1)
        self.gpu_memory = gauge("gpu_memory_bytes", "Peak CUDA memory allocated by this process.") \
            if torch.cuda.is_available() else None
        self._gauge = gauge
        self.rl: dict[str, Any] = {}  # made on first use, so only RL stages export them
        self.server = None
        if port:
            self.server, _ = start_http_server(port, registry=self.registry)
            log.info("Serving metrics port=%d", port)

    def set_rl(self, key: str, value: float) -> None:
        if key not in self.rl:
            self.rl[key] = self._gauge(*RL_FIGURES[key])
        self.rl[key].set(value)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


class CheckpointUpload(TrainerCallback):
    """Puts each checkpoint on the stage's remote (s3) output as soon as the Trainer has written it,
    not only at the end of the stage, so a stage whose pod is lost resumes from there
    (common.fetch_remote_checkpoint). Every rank runs it: once all have written their part, one
    process per node puts the node's files but trainer_state.json; once all nodes have, rank 0 puts
    trainer_state.json, the Trainer's last write, which marks a checkpoint complete, remote as local."""

    def __init__(self, out: Path, output_uri: str, rank: int, local_rank: int) -> None:
        self.out, self.output_uri, self.rank, self.local_rank = out, output_uri.rstrip("/"), rank, local_rank

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        name = f"checkpoint-{state.global_step}"
        barrier()
        if self.local_rank == 0:
            storage.put(self.out / name, f"{self.output_uri}/{name}", skip=(TRAINER_STATE,))
        barrier()
        if self.rank == 0:
            storage.put(self.out / name / TRAINER_STATE, f"{self.output_uri}/{name}/{TRAINER_STATE}")
            log.info("Uploaded checkpoint uri=%s/%s step=%d", self.output_uri, name, state.global_step)


class ProgressCallback(TrainerCallback):
    """Writes progress.json and updates the metrics at every log and save (rank 0 only)."""

    def __init__(self, out: Path, output_uri: str, metrics: Metrics | None, rl: bool = False) -> None:
        self.path = out / "progress.json"
        self.out = out
        self.output_uri = output_uri.rstrip("/")
        self.metrics = metrics
        self.loss: float | None = None
        self.lr: float | None = None
        self.tokens_per_second: float | None = None
        self.rl: dict[str, float] = {}
        self.report_rl = rl  # an RL stage (its registry entry scores samples): report RL_FIGURES
        self.start_time = time.time()
        self.start_step = 0
        self._last = (time.time(), 0, 0)  # time, tokens, step at the previous log
        if metrics:  # a restarted stage: its newest checkpoint is known before the model loads
            metrics.checkpoint_step.set(newest_checkpoint_step(out))

    # -- the file --

    def write(self, state: Any, status: str = "running") -> None:
        eta = None
        done = state.global_step - self.start_step
        if done > 0 and state.max_steps:
            eta = (time.time() - self.start_time) / done * max(state.max_steps - state.global_step, 0)
        ckpt = latest_checkpoint(self.out)
        write_json(self.path, {
            "step": int(state.global_step),
            "totalSteps": int(state.max_steps or 0),
            "loss": self.loss,
            "learningRate": self.lr,
            "epoch": float(state.epoch or 0.0),
            "etaSeconds": round(eta, 1) if eta is not None else None,
            "tokensPerSecond": self.tokens_per_second,
            "state": status,
            "lastCheckpoint": f"{self.output_uri}/{ckpt.name}" if ckpt else None,
            "updatedAt": now_rfc3339(),
            **({"rl": dict(self.rl)} if self.rl else {}),
        })

    # -- TrainerCallback --

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.start_time = time.time()
        self.start_step = state.global_step
        self._last = (self.start_time, int(state.num_input_tokens_seen or 0), state.global_step)
        if self.metrics:
            self.metrics.total_steps.set(state.max_steps)
            self.metrics.step.set(state.global_step)
            self.count(args, state)
        self.write(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "learning_rate" in logs:
            self.lr = float(logs["learning_rate"])
        for key in RL_FIGURES if self.report_rl else ():
            if key in logs:
                self.rl[key] = float(logs[key])
        t, tokens, step = time.time(), int(state.num_input_tokens_seen or 0), state.global_step
        t0, tokens0, step0 = self._last
        samples_per_second = None
        if step > step0 and t > t0:
            self.tokens_per_second = round((tokens - tokens0) / (t - t0), 1)
            batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            samples_per_second = (step - step0) * batch / (t - t0)
            self._last = (t, tokens, step)
        if self.metrics:
            m = self.metrics
            m.step.set(step)
            m.epoch.set(state.epoch or 0.0)
            self.count(args, state)
            if self.loss is not None:
                m.loss.set(self.loss)
            if self.lr is not None:
                m.learning_rate.set(self.lr)
            if self.tokens_per_second is not None:
                m.tokens_per_second.set(self.tokens_per_second)
            if samples_per_second is not None:
                m.samples_per_second.set(samples_per_second)
            if tokens > tokens0:
                m.tokens.inc(tokens - tokens0)
            if m.gpu_memory is not None:
                m.gpu_memory.set(torch.cuda.max_memory_allocated())
            for key, value in self.rl.items():
                m.set_rl(key, value)
        if "loss" in logs:
            log.info(
                "Trained step=%d/%d loss=%.4f lr=%.3g epoch=%.2f tokensPerSecond=%s",
                step, state.max_steps, self.loss or 0.0, self.lr or 0.0, state.epoch or 0.0, self.tokens_per_second,
            )
        self.write(state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            if self.metrics:
                self.metrics.step.set(state.global_step)
                self.count(args, state)
                self.metrics.checkpoint_step.set(newest_checkpoint_step(self.out))
            self.write(state)

    def count(self, args: Any, state: Any) -> None:
        """Tokens and samples trained up to the state's step (both restored with a checkpoint)."""
        assert self.metrics is not None
        self.metrics.tokens_trained.set(int(state.num_input_tokens_seen or 0))
        self.metrics.samples_trained.set(samples_trained(args, state))


def samples_trained(args: Any, state: Any) -> int:
    """Examples in the optimizer steps done: steps x per-device batch x accumulation x processes."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    return int(state.global_step) * int(per_step)


def newest_checkpoint_step(out: Path) -> int:
    """Step of the newest complete checkpoint in the stage folder, -1 when there is none."""
    return max((step for step, _, complete in checkpoints(out) if complete), default=-1)


def write_final(out: Path, output_uri: str, status: str, step: int = 0, total: int = 0, loss: float | None = None) -> None:
    """progress.json at the end of a stage (or when it failed before training started)."""
    path = out / "progress.json"
    previous: dict[str, Any] = {}
    if path.is_file():
        import json

        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
    ckpt = latest_checkpoint(out)
    data = {
        "step": step or previous.get("step", 0),
        "totalSteps": total or previous.get("totalSteps", 0),
        "loss": loss if loss is not None else previous.get("loss"),
        "learningRate": previous.get("learningRate"),
        "epoch": previous.get("epoch", 0.0),
        "etaSeconds": 0.0 if status == "succeeded" else None,
        "tokensPerSecond": previous.get("tokensPerSecond"),
        **({"rl": previous["rl"]} if previous.get("rl") else {}),
        "state": status,
        "lastCheckpoint": f"{output_uri.rstrip('/')}/{ckpt.name}" if ckpt else previous.get("lastCheckpoint"),
        "updatedAt": now_rfc3339(),
    }
    write_json(path, data)
