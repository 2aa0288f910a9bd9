"""What every recipe shares: the run context, its data, TrainingArguments, DeepSpeed, checkpoints, metrics.json.

A recipe reads like this (see recipes/sft.py):

    def run(run: StageRun, ctx: Context) -> dict:
        train_rows, held_out = common.load_data(run)                        # load
        processing_class, model = ...                                       # build
        before = evals....(model, held_out)
        trainer = SFTTrainer(model, args=common.training_args(run, ctx, SFTConfig, ...), ...)
        common.train(trainer, ctx)                                          # train (resumes)
        common.save(trainer, run, ctx, processing_class)                    # save
        return common.report(...)                                           # metrics.json

Defaults that depend on the stage type (learning rates, the primary held-out figure, the model
head) come from its registry entry, `run.info`.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from kubetune.api import StageRun, registry
from kubetune.api.finetunejob import DEFAULT_MAX_LENGTH

from kubetune_trainer import bottleneck, models, storage

log = logging.getLogger("kubetune_trainer")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"

# Held-out examples scored before and after training (generation is the slow part).
EVAL_LIMIT = 200


@dataclass
class Context:
    """Where a stage writes and which process this is."""

    out: Path  # the stage folder: model, tokenizer, checkpoints, metrics.json, progress.json
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: float = field(default_factory=time.time)
    callbacks: list[Any] = field(default_factory=list)  # TrainerCallbacks launch.py adds (progress, metrics)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --- data ---------------------------------------------------------------------------------


def load_data(run: StageRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows and held-out rows (validationUri, else validationFraction of the rows, else none)."""
    from kubetune_trainer.data import load_rows, split_rows

    d = run.dataset
    rows = load_rows(d.uri, d.format, d.columns)
    if not rows:
        raise ValueError(f"dataset {d.uri} has no rows")
    if d.validation_uri:
        held_out = load_rows(d.validation_uri, d.format, d.columns, held_out=True)
    elif d.validation_fraction > 0:
        rows, held_out = split_rows(rows, d.validation_fraction, run.hyperparameters.seed)
    else:
        held_out = []
    log.info("Loaded dataset uri=%s format=%s rows=%d heldOut=%d", d.uri, d.format, len(rows), len(held_out))
    return rows, held_out


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)


def eval_dataset(run: StageRun, held_out: list[dict[str, Any]]) -> Any:
    """The held-out rows for the Trainer's periodic evaluation (hyperparameters.evalSteps), or None."""
    return to_dataset(held_out) if run.hyperparameters.eval_steps and held_out else None


# --- TrainingArguments --------------------------------------------------------------------


def learning_rate(run: StageRun) -> float:
    if run.hyperparameters.learning_rate is not None:
        return run.hyperparameters.learning_rate
    method = registry.tuning_method(run.tuning.method)
    if method.learning_rate is not None:
        return method.learning_rate
    full, lora = run.info.learning_rates
    return full if run.tuning.method == "full" else lora


def max_length(run: StageRun) -> int:
    """hyperparameters.maxLength (text stages), default DEFAULT_MAX_LENGTH tokens."""
    return run.hyperparameters.max_length or DEFAULT_MAX_LENGTH


def deepspeed_config(run: StageRun) -> dict[str, Any] | None:
    """The ZeRO config for distributed.deepspeed; "auto" values are filled in by transformers from TrainingArguments."""
    spec = run.distributed.deepspeed
    if spec is None:
        return None
    zero: dict[str, Any] = {
        "stage": spec.zero_stage,
        "overlap_comm": torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if spec.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # save_model writes one full 16-bit state dict, so the stage folder is a plain HF model
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if spec.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if spec.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if spec.offload == "cpu" and not torch.cuda.is_available():
        # DeepSpeed's CPU Adam needs a compiler at run time; on CPU-only hosts use torch's AdamW.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def training_args(run: StageRun, ctx: Context, config_cls: type, evaluate: bool = False, **recipe: Any) -> Any:
    """`config_cls` (a TRL config or TrainingArguments) filled from the StageRun's hyperparameters;
    `evaluate`: there is an eval dataset (see `eval_dataset`) to score every evalSteps steps."""
    hp = run.hyperparameters
    dtype = models.compute_dtype(hp.precision)
    fast = models.fast_path(run)
    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.out),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        learning_rate=learning_rate(run),
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        warmup_steps=hp.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=hp.weight_decay,
        lr_scheduler_type=hp.lr_scheduler_type,
        seed=hp.seed,
        data_seed=hp.seed,
        save_strategy="steps",
        save_steps=hp.save_steps,
        save_total_limit=hp.save_total_limit,
        logging_strategy="steps",
        logging_steps=hp.logging_steps,
        logging_first_step=True,
        activation_checkpointing=hp.gradient_checkpointing,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="all",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        deepspeed=deepspeed_config(run),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=hp.eval_steps if evaluate else None,
        optim="adamw_torch_fused" if fast.fused_adamw else "adamw_torch",
        use_liger_kernel=fast.liger,
    )
    kwargs.update(recipe)
    return config_cls(**kwargs)


# --- checkpoints --------------------------------------------------------------------------


def checkpoints(out: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every checkpoint-N folder, oldest first.

    Complete means the Trainer got to its last write, trainer_state.json (after weights,
    optimizer and RNG state); a checkpoint cut short by a kill lacks it.
    """
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p, (p / TRAINER_STATE).is_file()))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in the stage folder, or None."""
    complete = [p for _, p, ok in checkpoints(out) if ok]
    return complete[-1] if complete else None


def fetch_remote_checkpoint(out: Path, output_uri: str) -> Path | None:
    """A stage restarted on a fresh pod (its emptyDir gone with the old one) whose output is on s3:
    fetch the newest complete checkpoint uploaded there (CheckpointUpload puts trainer_state.json
    last, so a remote checkpoint with it is complete) into the stage folder. Run once per node."""
    if storage.scheme(output_uri) != "s3" or latest_checkpoint(out) is not None:
        return None
    steps = [int(m.group(1)) for key in storage.list_keys(output_uri)
             if (m := CHECKPOINT_RE.match(key.split("/")[0])) and key.split("/", 1)[1:] == [TRAINER_STATE]]
    if not steps:
        return None
    name = f"checkpoint-{max(steps)}"
    shutil.rmtree(out / name, ignore_errors=True)  # an incomplete local copy
    storage.get(f"{output_uri.rstrip('/')}/{name}", out / name)
    log.info("Fetched checkpoint uri=%s/%s step=%d", output_uri.rstrip("/"), name, max(steps))
    return out / name


def drop_incomplete_checkpoints(out: Path) -> None:
    for step, p, ok in checkpoints(out):
        if not ok:
            log.warning("Removed incomplete checkpoint path=%s step=%d", p, step)
            shutil.rmtree(p, ignore_errors=True)


def train(trainer: Any, ctx: Context) -> Any:
    """trainer.train(), resuming from the newest complete checkpoint of an earlier attempt."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressCallback logs each step in kubetune's format
    if ctx.is_main:
        drop_incomplete_checkpoints(ctx.out)
    barrier()
    resume = latest_checkpoint(ctx.out)
    if resume is not None:
        log.info("Resuming from checkpoint path=%s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return result


def save(trainer: Any, run: StageRun, ctx: Context, processing_class: Any,
         base_loader: models.BaseLoader | None = None) -> None:
    """Write the model (or adapter), its processing class and, with merge (LoRA, IA3), `<out>/merged`
    (the adapter folded into its base, loaded by `base_loader`; see models.merge_adapter)."""
    if run.tuning.method == "adapter":  # bottleneck adapters: only their weights, not the frozen base
        if ctx.is_main:
            bottleneck.save(trainer.model, ctx.out)
    else:
        trainer.save_model(str(ctx.out))  # every rank: DeepSpeed ZeRO-3 gathers the shards
    if ctx.is_main:
        processing_class.save_pretrained(str(ctx.out))
        models.stop_at_end_of_turn(ctx.out, processing_class)
        if run.merge and registry.tuning_method(run.tuning.method).mergeable:
            models.merge_adapter(run, ctx.out, processing_class, base_loader)
    barrier()


def rl_figures(trainer: Any) -> dict[str, float]:
    """An RL stage's figures from its log: mean reward at the first and last logging steps, and the
    last KL to the reference and entropy (the keys of callbacks.RL_FIGURES)."""
    logged = [e for e in trainer.state.log_history if "reward" in e]
    if not logged:
        return {}
    out = {"rewardFirst": float(logged[0]["reward"]), "rewardLast": float(logged[-1]["reward"])}
    for key, name in (("kl", "klLast"), ("entropy", "entropyLast")):
        if key in logged[-1]:
            out[name] = float(logged[-1][key])
    return out


def last_train_loss(trainer: Any) -> float | None:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return float(losses[-1]) if losses else None


def report(
    run: StageRun,
    ctx: Context,
    trainer: Any,
    before: dict[str, float] | None,
    after: dict[str, float] | None,
    sample: dict[str, Any] | None,
    held_out: int,
    rl: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The content of metrics.json (launch.py writes it): train loss, held-out figures (the
    registry's primary one named), a sample."""
    state = trainer.state
    train_loss = last_train_loss(trainer)
    runtime = time.time() - ctx.started
    flat: dict[str, float] = {}
    if train_loss is not None:
        flat["trainLoss"] = train_loss
    for k, v in (after or {}).items():
        flat[k] = v
    for k, v in (before or {}).items():
        flat[k + "Before"] = v
    for k, v in (rl or {}).items():
        flat[k] = v
    return {
        "job": run.job,
        "stage": run.stage,
        "type": run.type,
        "method": run.tuning.method,
        "parameters": models.count_parameters(trainer.model),
        "trainableParameters": models.count_parameters(trainer.model, trainable=True),
        "peakGpuMemoryBytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "globalStep": state.global_step,
        "epoch": state.epoch,
        "trainLoss": train_loss,
        "tokensSeen": int(state.num_input_tokens_seen or 0),
        "runtimeSeconds": round(runtime, 1),
        "heldOutExamples": held_out,
        "primary": run.info.primary,
        "before": before,
        "after": after,
        "sample": sample,
        "fastPath": models.fast_path(run).as_dict(),
        **({"rl": rl} if rl else {}),
        "metrics": flat,
    }
