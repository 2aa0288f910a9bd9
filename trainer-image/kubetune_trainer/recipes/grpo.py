"""kubetune-train STAGERUN.json   (a stage of type grpo)

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) with TRL's GRPOTrainer.
For each prompt the policy samples `grpo.numGenerations` completions; each is scored, and its
advantage is its reward relative to the others of its group (no value model). The loss is
the clipped policy-gradient objective with a KL penalty toward the model the stage started
from (`grpo.beta`; with LoRA the reference is the base with its adapter disabled).

Rewards, summed per completion:
    exactMatch      1 when the answer equals the row's reference (whitespace aside), else 0
    numericMatch    1 when the answer's last number equals the reference's, else 0
    format          1 when the answer matches grpo.formatPattern (re.fullmatch), else 0
    lengthPenalty   minus the answer's length in tokens over grpo.maxCompletionLength
    a reward model  grpo.rewardModelUri, else the output of the job's last reward stage (when
                    there is one): its score of prompt + answer

Data: promptCompletion rows (the completion is the reference answer) or messages rows (the
prompt is every turn before the last assistant turn, whose content is the reference).
Sampling runs on transformers; on a GPU with vLLM in the image, on vLLM colocated with the
trainer. Reported per logging step: mean reward, KL to the reference and entropy
(progress.json, the trainer's Prometheus metrics); held-out figure: exact match of greedy
answers before and after, plus the mean reward of the first and last logging steps.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from kubetune.api import StageRun
from kubetune.api.registry import GrpoSpec
from trl import GRPOConfig, GRPOTrainer

from kubetune_trainer import common, evals, models
from kubetune_trainer.common import Context

log = logging.getLogger("kubetune_trainer")

RewardFunc = Callable[..., list[float]]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(completions: Sequence[Any], reference: Sequence[str], **_: Any) -> list[float]:
    return [float(evals.normalise(evals.completion_text(c)) == evals.normalise(r))
            for c, r in zip(completions, reference, strict=True)]


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def numeric_match(completions: Sequence[Any], reference: Sequence[str], **_: Any) -> list[float]:
    out = []
    for c, r in zip(completions, reference, strict=True):
        got, want = _last_number(evals.completion_text(c)), _last_number(r)
        out.append(float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))))
    return out


def format_reward(pattern: str) -> RewardFunc:
    compiled = re.compile(pattern, re.DOTALL)

    def format(completions: Sequence[Any], **_: Any) -> list[float]:
        return [float(compiled.fullmatch(evals.completion_text(c).strip()) is not None) for c in completions]

    return format


def length_penalty(max_length: int) -> RewardFunc:
    def length_penalty(completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
                       **_: Any) -> list[float]:
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None \
            else [len(evals.completion_text(c).split()) for c in completions]
        return [-min(1.0, n / max_length) for n in lengths]

    return length_penalty


def reward_functions(spec: GrpoSpec) -> list[RewardFunc]:
    """The built-in reward functions grpo.rewardFunctions names, in its order."""
    out: list[RewardFunc] = []
    for name in spec.reward_functions:
        if name == "exactMatch":
            out.append(exact_match)
        elif name == "numericMatch":
            out.append(numeric_match)
        elif name == "format":
            if not spec.format_pattern:
                raise ValueError("grpo.rewardFunctions has format: set grpo.formatPattern")
            out.append(format_reward(spec.format_pattern))
        elif name == "lengthPenalty":
            out.append(length_penalty(spec.max_completion_length))
    return out


def prompt_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """{prompt, reference} per row: promptCompletion as is, messages split before the last answer."""
    out = []
    for row in rows:
        if "messages" in row:
            split = evals.split_conversation(row["messages"])
            if split:
                out.append({"prompt": split[0], "reference": split[1]})
        else:
            out.append({"prompt": row["prompt"], "reference": evals.completion_text(row["completion"])})
    if not out:
        raise ValueError("no row has a prompt and a reference answer to score completions against")
    return out


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    hp = run.hyperparameters
    spec = run.settings(GrpoSpec)

    # --- load
    rows, held_out = common.load_data(run)
    prompts = prompt_rows(rows)

    # --- build
    models.check_tuning(run)
    tokenizer = models.load_tokenizer(run)
    if run.dataset.format == "messages":
        models.ensure_chat_template(tokenizer, None)
    model = models.load_model(run, tokenizer)
    model = models.prepare_for_kbit(model, run)
    rewards: list[Any] = reward_functions(spec)
    reward_tokenizers: list[Any] = [None] * len(rewards)
    if run.reward_model_uri:
        scorer, scorer_tokenizer = models.load_scorer(run, run.reward_model_uri)
        rewards.append(scorer)
        reward_tokenizers.append(scorer_tokenizer)
    if not rewards:
        raise ValueError("grpo.rewardFunctions is empty and there is no reward model; list a reward function or set "
                         "grpo.rewardModelUri")
    world = ctx.world_size
    if (hp.batch_size * hp.gradient_accumulation_steps * world) % spec.num_generations:
        raise ValueError(
            f"hyperparameters.batchSize x gradientAccumulationSteps x processes ({hp.batch_size} x "
            f"{hp.gradient_accumulation_steps} x {world}) must be a multiple of grpo.numGenerations "
            f"({spec.num_generations}): each step samples whole groups"
        )
    pairs = evals.prompts_and_references(held_out[: common.EVAL_LIMIT], tokenizer)

    before = answers_before = None
    if ctx.is_main and pairs:
        accuracy, answers_before = evals.exact_match(model, tokenizer, pairs)
        before = {"exactMatch": accuracy}
    common.barrier()

    use_vllm = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    args = common.training_args(
        run, ctx, GRPOConfig,
        num_generations=spec.num_generations,
        max_completion_length=spec.max_completion_length,
        beta=spec.beta,
        loss_type=spec.loss_type,
        temperature=spec.temperature,
        num_iterations=spec.num_iterations,
        epsilon=spec.epsilon,
        use_vllm=use_vllm,
        vllm_mode="colocate",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=common.to_dataset(prompts),
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers,
        peft_config=models.peft_config(run),
        callbacks=ctx.callbacks,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, tokenizer)

    after = sample = None
    if ctx.is_main and pairs:
        assert answers_before is not None
        after, sample = evals.exact_match_after(run, ctx.out, tokenizer, pairs, answers_before)
    return common.report(run, ctx, trainer, before, after, sample, len(pairs), rl=common.rl_figures(trainer))
