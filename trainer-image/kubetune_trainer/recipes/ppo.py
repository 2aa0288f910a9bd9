"""kubetune-train STAGERUN.json   (a stage of type ppo)

RLHF with PPO, InstructGPT's third step: the policy (the stage's input model, an SFT model)
learns to raise a reward model's score while a per-token KL penalty keeps it near the
reference (the same input model, frozen). kubetune's own implementation: TRL 1.16 has no PPO
trainer (PPOTrainer moved to `trl.experimental` and was then removed), and OpenRLHF and verl
run PPO only on Ray with vLLM on GPUs. It follows the known-good recipe of "The N
Implementation Details of RLHF with PPO" (Huang et al., 2023, after OpenAI's
lm-human-preferences) and TRL's last PPOTrainer, whose defaults `Settings` keeps. One step
is one PPO iteration:

1. rollout: each process samples an answer (`ppo.temperature`, no top-k or top-p, at most
   `ppo.maxCompletionLength` tokens) to batchSize x gradientAccumulationSteps x
   `ppo.miniBatches` prompts (left-padded); an answer ends at its first end-of-turn token;
2. score: the reward model's output at the answer's last token, optionally normalised to mean
   0 and std 1 over the starting policy's answers (`ppo.normalizeScores`, lm-human-preferences);
   an answer that never ends loses `ppo.missingEosPenalty`;
3. reward per token: -klCoef x KL(policy || reference) at every answer token (`ppo.klEstimator`
   k1 or k3), plus the score at the last one; `ppo.klTarget` adapts klCoef (Ziegler et al.);
4. advantages by GAE (`ppo.gamma`, `ppo.gaeLambda`) over the value model's per-token values,
   whitened; returns = advantages + values;
5. `ppo.ppoEpochs` passes over the rollout in `ppo.miniBatches` shuffled mini-batches (one
   optimizer step each, of batchSize x gradientAccumulationSteps answers): the clipped
   policy-ratio loss (`ppo.clipRange`) + `ppo.valueCoef` x the clipped value loss
   (`ppo.valueClipRange`). For the first `ppo.valueWarmupSteps` steps only the value model
   learns (OpenRLHF's freezing_actor_steps): its copy of the reward model knows answers' ends,
   not the tokens before them, and advantages from it would first push the policy at random.

Models. The value model starts as a copy of the reward model (`ppo.rewardModelUri`, default
the output of the job's last reward stage: the StageRun's rewardModelUri) and trains with the
policy in one module, so one optimizer and one DeepSpeed ZeRO-2 engine or DDP wrapper hold
both. With LoRA / QLoRA both get adapters, and the reference is the policy with its adapter
disabled: no second copy. Dropout is off everywhere (the N details), and logits are divided by
the temperature wherever log-probabilities are taken. ZeRO-3 is refused (sampling would
gather every layer at each token).

Logged every loggingSteps, as means over the steps since the last log (trainer_state.json;
metrics.json `history` and `rl`; progress.json "rl" and the kubetune_trainer_* gauges of
callbacks.RL_FIGURES): reward (what PPO maximises at answers' ends: the score, normalised,
less the penalty), reward_model_score (the raw score), kl (KL to the reference per answer,
k1), entropy (per answer token), value_loss, policy_loss, clip_fraction,
value_clip_fraction, explained_variance, approx_kl, kl_coef, answer_length, ended_fraction,
and the total `loss`.
A checkpoint (`checkpoint-N`, trainer_state.json last) holds the policy (or its adapter), the
value model in `value/`, the optimizer and scheduler of both, the RNG states and
`ppo_state.json` (KL coefficient, score normalisation); the stage folder ends with the policy
where the next stage looks for a model, and the value model in `value/`.

Held-out figures (greedy answers to held-out prompts, before and after): meanReward (the
reward model's mean raw score), exactMatch against the row's reference answer,
endedFraction; after training also klToReference (the mean over held-out prompts of
sum log pi/pi_ref over an answer sampled at the training temperature: the KL per answer).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubetune.api import StageRun
from kubetune.api.registry import PpoSpec
from transformers import Trainer, TrainingArguments

from kubetune_trainer import common, evals, models, storage
from kubetune_trainer.common import Context

log = logging.getLogger("kubetune_trainer")

VALUE_DIR = "value"  # the value model, inside the stage folder and each checkpoint
PPO_STATE = "ppo_state.json"  # what a checkpoint needs besides the Trainer's files


# A ppo stage's settings: its spec block, with the defaults of TRL's last PPOConfig.
Settings = PpoSpec


# --- the pieces of PPO (pure functions on tensors) ----------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked values."""
    n = mask.sum()
    if n < 2:
        raise ValueError("whitening needs two or more answer tokens per process; raise hyperparameters.batchSize")
    centred = (values - masked_mean(values, mask)) * mask
    return (centred**2).sum() / (n - 1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked values (the mean kept when shift_mean is false); 0 outside the mask."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probabilities.

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = pi_ref / pi (unbiased, never negative; Schulman, "Approximating KL divergence").
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator}; use k1 or k3")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-klCoef * kl at every answer token, plus each answer's score at its last token; 0 after the answer."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over answer tokens; (advantages, returns = advantages + values).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}; past an answer's
    last token rewards and values count as 0, so its last delta is r_T - V_T.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, max(-A r, -A clip(r, 1 - e, 1 + e)) with r = pi / pi_old, averaged
    over answer tokens; and the clip fraction (the share of tokens where the clipped term wins)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (clip(V, V_old - e, V_old + e) - R)^2) averaged over answer tokens;
    and the share of tokens where the clipped term wins."""
    clipped_values = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 when the value model predicts the returns, <= 0 when it does not."""
    var_returns = float(masked_var(returns, mask))
    if var_returns == 0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask)) / var_returns


def adapt_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, answers: int) -> float:
    """Ziegler et al.'s adaptive KL controller: move klCoef by the proportional error
    clip(kl / target - 1, -0.2, 0.2), scaled by answers / horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * answers / horizon)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of `logits` at each position."""
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at each position, without materialising the whole log-softmax."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def answer_mask(responses: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the answer tokens: up to and including the first stop token, or all of them;
    whether each answer ended with a stop token)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device)).long()
    before_first_stop = (is_stop.cumsum(1) - is_stop) == 0
    return before_first_stop.float(), is_stop.bool().any(1)


# --- answers: prompts and sampled answers side by side ------------------------------------


@dataclass
class Answers:
    """[left-padded prompt | answer, right-padded] for a batch, with what the forward passes need."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R): 0 at each prompt's first real token
    prompt_width: int  # P
    mask: torch.Tensor  # (B, R) float: the answer's tokens
    ended: torch.Tensor  # (B,) bool: the answer ended with an end-of-turn token

    @property
    def tokens(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: torch.Tensor | slice) -> Answers:
        return Answers(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                       self.prompt_width, self.mask[index], self.ended[index])

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def _device(model: Any) -> torch.device:
    device: torch.device = next(model.parameters()).device
    return device


@torch.no_grad()
def sample(
    policy: Any, prompts: list[list[int]], pad_id: int, stop_ids: list[int], max_new_tokens: int,
    temperature: float | None, chunk: int,
) -> Answers:
    """An answer to each prompt: sampled at `temperature` (pure sampling: no top-k, no top-p), or greedy when None."""
    device = _device(policy)
    width = max(len(p) for p in prompts)
    queries = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    query_mask = torch.zeros_like(queries)
    for i, p in enumerate(prompts):
        queries[i, width - len(p):] = torch.tensor(p)
        query_mask[i, width - len(p):] = 1
    queries, query_mask = queries.to(device), query_mask.to(device)
    tokens = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(tokens.shape, device=device)
    how: dict[str, Any] = {"do_sample": False}
    if temperature is not None:
        how = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    was_training = policy.training
    policy.eval()
    try:
        for i in range(0, len(prompts), chunk):
            out = policy.generate(
                input_ids=queries[i:i + chunk], attention_mask=query_mask[i:i + chunk], max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids, pad_token_id=pad_id, **how,
            )
            generated = out[:, width:]
            m, _ = answer_mask(generated, stop_ids)
            tokens[i:i + chunk, :generated.shape[1]] = torch.where(m.bool(), generated, pad_id)
            mask[i:i + chunk, :generated.shape[1]] = m
    finally:
        policy.train(was_training)
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=device)) & mask.bool()
    attention = torch.cat([query_mask, mask.long()], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return Answers(torch.cat([queries, tokens], 1), attention, positions, width, mask, is_stop.any(1))


def answer_logits(model: Any, answers: Answers, temperature: float) -> torch.Tensor:
    """The causal LM's logits predicting each answer token, divided by the temperature, in fp32."""
    logits: torch.Tensor = model(**answers.inputs()).logits
    return logits[:, answers.prompt_width - 1:-1].float() / temperature


def head_outputs(model: Any, answers: Answers) -> torch.Tensor:
    """A one-output sequence classifier's score head applied at every position: (B, P + R).

    The reward model's score of a sequence is its output at the last token; the value model's
    value of the state before answer token t is its output at the position that predicts t.
    """
    from peft import PeftModel

    base: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = getattr(base, base.base_model_prefix)
    head = base.score if hasattr(base, "score") else base.classifier
    hidden = backbone(**answers.inputs()).last_hidden_state
    out: torch.Tensor = head(hidden).squeeze(-1).float()
    return out


def answer_values(outputs: torch.Tensor, answers: Answers, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """The value of the state before each answer token, in the units of the scores PPO maximises
    (the value model, a copy of the reward model, speaks the reward model's units)."""
    return (outputs[:, answers.prompt_width - 1:-1] - shift) / scale * answers.mask


def final_scores(outputs: torch.Tensor, answers: Answers) -> torch.Tensor:
    """The reward model's score of each answer: its output at the answer's last token."""
    last = answers.prompt_width + answers.mask.sum(1).long() - 1
    return outputs.gather(1, last.unsqueeze(1)).squeeze(1)


def objective_scores(scores: torch.Tensor, ended: torch.Tensor, shift: float, scale: float,
                     missing_eos_penalty: float) -> torch.Tensor:
    """What PPO maximises at an answer's end: (score - shift) / scale, less the penalty if it never ended."""
    return (scores - shift) / scale - missing_eos_penalty * (~ended).float()


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module: one optimizer, one DDP or DeepSpeed wrapper.

    forward -> (policy logits, value head outputs at every position).
    """

    def __init__(self, policy: Any, value: Any) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.config = policy.config  # the Trainer and DeepSpeed's "auto" sizes read the config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        answers_in = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logits = self.policy(**answers_in).logits
        values = head_outputs(self.value, Answers(input_ids, attention_mask, position_ids, 0,
                                                  attention_mask.float(), attention_mask.bool().any(1)))
        return logits, values

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        for m in (self.policy, self.value):
            m.activation_checkpointing_enable(**kwargs)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off (LoRA's included): the ratio pi / pi_old must be 1 before the first update."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            setattr(m, "attention_dropout", 0.0)


# --- the trainer --------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout batch on this process, ready for the PPO epochs."""

    answers: Answers
    logprobs: torch.Tensor  # (B, R) under the policy that sampled
    values: torch.Tensor  # (B, R) of the value model before the update
    advantages: torch.Tensor  # (B, R) whitened
    returns: torch.Tensor  # (B, R)
    stats: dict[str, float]


class PpoTrainer(Trainer):
    """transformers' Trainer with the PPO loop in place of its own.

    The Trainer brings what every recipe relies on: accelerate / DeepSpeed setup, the optimizer
    and scheduler, callbacks (progress.json, metrics), logging, checkpoints written and rotated
    with trainer_state.json last, and resuming from them. One Trainer step is one PPO iteration
    (rollout, then ppoEpochs x miniBatches optimizer steps); the scheduler steps once per iteration.
    """

    def __init__(
        self, *, model: PolicyAndValue, args: TrainingArguments, processing_class: Any, callbacks: list[Any],
        reward_model: Any, reference: Any | None, prompts: list[list[int]], settings: Settings, stop_ids: list[int],
    ) -> None:
        super().__init__(model=model, args=args, processing_class=processing_class, callbacks=callbacks)
        self.reward_model = reward_model
        self.reference = reference  # None: the policy with its LoRA adapter disabled
        self.prompts = prompts
        self.settings = settings
        self.stop_ids = stop_ids
        self.kl_coef = settings.kl_coef
        self.score_shift, self.score_scale = 0.0, 1.0  # normalizeScores: the starting policy's mean and std
        self.rollout_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * settings.mini_batches
        self._since_log: list[dict[str, float]] = []

    # -- models --

    def unwrapped(self) -> PolicyAndValue:
        model: PolicyAndValue = self.accelerator.unwrap_model(self.model_wrapped)
        return model

    @contextmanager
    def reference_model(self) -> Iterator[Any]:
        """The reference: the frozen copy, or the policy with its adapter disabled (LoRA)."""
        if self.reference is not None:
            yield self.reference
            return
        policy = self.unwrapped().policy
        with policy.disable_adapter():
            yield policy

    # -- data: the same prompt order on every attempt, so a resumed stage continues it --

    def prompt_batch(self, step: int) -> list[list[int]]:
        """This process's prompts of PPO iteration `step`: each epoch a fresh permutation (seeded)."""
        n = len(self.prompts)
        world = self.args.world_size
        start = (step * world + self.args.process_index) * self.rollout_size
        out: list[list[int]] = []
        order: torch.Tensor | None = None
        order_epoch = -1
        for i in range(start, start + self.rollout_size):
            epoch = i // n
            if epoch != order_epoch:
                g = torch.Generator().manual_seed(self.args.seed + epoch)
                order, order_epoch = torch.randperm(n, generator=g), epoch
            assert order is not None
            out.append(self.prompts[int(order[i % n])])
        return out

    # -- one PPO iteration --

    @torch.no_grad()
    def rollout(self, step: int) -> Rollout:
        s = self.settings
        both = self.unwrapped()
        tokenizer: Any = self.processing_class
        micro = self.args.per_device_train_batch_size
        answers = sample(both.policy, self.prompt_batch(step), tokenizer.pad_token_id, self.stop_ids,
                         s.max_completion_length, s.temperature, chunk=micro)
        logprobs, ref_logprobs, values, scores, entropies = [], [], [], [], []
        both.eval()
        for i in range(0, len(answers), micro):
            part = answers.select(slice(i, i + micro))
            logits = answer_logits(both.policy, part, s.temperature)
            logprobs.append(token_logprobs(logits, part.tokens))
            entropies.append(entropy(logits))
            del logits
            with self.reference_model() as reference:
                ref_logprobs.append(token_logprobs(answer_logits(reference, part, s.temperature), part.tokens))
            values.append(answer_values(head_outputs(both.value, part), part, self.score_shift, self.score_scale))
            scores.append(final_scores(head_outputs(self.reward_model, part), part))
        both.train()
        mask = answers.mask
        old_logprobs, ref_lp = torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask
        old_values, raw_score = torch.cat(values), torch.cat(scores)
        score = objective_scores(raw_score, answers.ended, self.score_shift, self.score_scale, s.missing_eos_penalty)
        kl = kl_penalty(old_logprobs, ref_lp, s.kl_estimator) * mask
        rewards = token_rewards(score, kl, mask, self.kl_coef)
        if s.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, s.gamma, s.gae_lambda)
        advantages = whiten(advantages, mask)
        stats = {
            "reward": float(score.mean()),
            "reward_model_score": float(raw_score.mean()),
            "kl": float(((old_logprobs - ref_lp) * mask).sum(1).mean()),
            "entropy": float(masked_mean(torch.cat(entropies), mask)),
            "explained_variance": explained_variance(old_values, returns, mask),
            "answer_length": float(mask.sum(1).mean()),
            "ended_fraction": float(answers.ended.float().mean()),
        }
        self.state.num_input_tokens_seen += int(self.accelerator.reduce(
            answers.attention_mask.sum().to(self.args.device), reduction="sum"))
        return Rollout(answers, old_logprobs, old_values, advantages, returns, stats)

    @torch.no_grad()
    def calibrate_scores(self) -> None:
        """normalizeScores: the reward model's mean and std over the starting policy's answers to
        256 training prompts (lm-human-preferences' reward normalisation), all processes together."""
        s, both = self.settings, self.unwrapped()
        tokenizer: Any = self.processing_class
        per_step = self.rollout_size * self.args.world_size
        found = []
        for step in range(math.ceil(256 / per_step)):
            answers = sample(both.policy, self.prompt_batch(step), tokenizer.pad_token_id, self.stop_ids,
                             s.max_completion_length, s.temperature, chunk=self.args.per_device_train_batch_size)
            micro = self.args.per_device_train_batch_size
            found += [final_scores(head_outputs(self.reward_model, part), part)
                      for part in (answers.select(slice(i, i + micro)) for i in range(0, len(answers), micro))]
        local = torch.cat(found)
        moments = torch.stack([local.sum(), (local**2).sum(), local.new_tensor(float(len(local)))]).to(self.args.device)
        total, squares, n = self.accelerator.reduce(moments, reduction="sum").tolist()
        mean = total / n
        self.score_shift, self.score_scale = mean, math.sqrt(max(squares / n - mean**2, 1e-8))
        log.info("Normalised reward model scores mean=%.4g std=%.4g answers=%d", mean, self.score_scale, int(n))

    def ppo_state(self) -> dict[str, float]:
        return {"klCoef": self.kl_coef, "scoreShift": self.score_shift, "scoreScale": self.score_scale}

    def optimise(self, model: Any, batch: Rollout) -> dict[str, float]:
        """ppoEpochs passes over the rollout, miniBatches optimizer steps each."""
        s, args = self.settings, self.args
        trainer: Any = self  # the Trainer's internals are untyped
        micro, accumulate = args.per_device_train_batch_size, args.gradient_accumulation_steps
        mini = micro * accumulate
        deepspeed = self.is_deepspeed_enabled
        # while the value model warms up the policy loss counts 0 (it stays in the graph for DDP)
        policy_weight = 0.0 if self.state.global_step < s.value_warmup_steps else 1.0
        sums: dict[str, float] = {}
        count = 0
        model.train()
        for _ in range(s.ppo_epochs):
            order = torch.randperm(len(batch.answers), device=batch.logprobs.device)
            for start in range(0, len(batch.answers), mini):
                for k in range(accumulate):
                    index = order[start + k * micro:start + (k + 1) * micro]
                    last = k == accumulate - 1
                    self.accelerator.gradient_state._set_sync_gradients(last)
                    part = batch.answers.select(index)
                    sync = nullcontext() if last or deepspeed else self.accelerator.no_sync(model)
                    with sync:
                        logits, outputs = model(**part.inputs())
                        logits = logits[:, part.prompt_width - 1:-1].float() / s.temperature
                        new_logprobs = token_logprobs(logits, part.tokens) * part.mask
                        new_values = answer_values(outputs, part, self.score_shift, self.score_scale)
                        pg, clip_fraction = policy_loss(new_logprobs, batch.logprobs[index], batch.advantages[index],
                                                        part.mask, s.clip_range)
                        vf, value_clip_fraction = value_loss(new_values, batch.values[index], batch.returns[index],
                                                             part.mask, s.value_clip_range)
                        loss = policy_weight * pg + s.value_coef * vf
                        kwargs = {"scale_wrt_gas": False} if deepspeed else {}
                        self.accelerator.backward(loss / accumulate, **kwargs)
                    with torch.no_grad():
                        step_stats = {
                            "loss": float(loss), "policy_loss": float(pg), "value_loss": float(vf),
                            "clip_fraction": float(clip_fraction), "value_clip_fraction": float(value_clip_fraction),
                            "approx_kl": float(0.5 * masked_mean((new_logprobs - batch.logprobs[index]) ** 2,
                                                                part.mask)),
                        }
                    for key, v in step_stats.items():
                        sums[key] = sums.get(key, 0.0) + v
                    count += 1
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    trainer._clip_grad_norm(model)
                trainer.optimizer.step()
                model.zero_grad()
        return {k: v / max(count, 1) for k, v in sums.items()}

    # -- the loop, in place of Trainer._inner_training_loop --

    def _inner_training_loop(
        self, batch_size: int | None = None, args: Any = None, resume_from_checkpoint: str | None = None,
        trial: Any = None, ignore_keys_for_eval: Any = None,
    ) -> Any:
        trainer: Any = self  # the Trainer's internals are untyped
        self.accelerator.free_memory()
        max_steps = self.args.max_steps
        per_epoch = max(len(self.prompts) // (self.rollout_size * self.args.world_size), 1)
        self._init_training_state(max_steps, per_epoch, math.ceil(max_steps / per_epoch), resume_from_checkpoint, trial)
        model, _ = trainer._prepare_for_training(max_steps, None, resume_from_checkpoint)
        if resume_from_checkpoint is not None:
            self._load_rng_state(resume_from_checkpoint)
            state = json.loads((Path(resume_from_checkpoint) / PPO_STATE).read_text())
            self.kl_coef, self.score_shift, self.score_scale = state["klCoef"], state["scoreShift"], state["scoreScale"]
        elif self.settings.normalize_scores:
            self.calibrate_scores()
        log.info("Training ppo steps=%d rolloutBatch=%d worldSize=%d prompts=%d",
                 max_steps, self.rollout_size, self.args.world_size, len(self.prompts))
        start_time = time.time()
        self._initial_num_input_tokens_seen = self.state.num_input_tokens_seen
        self._initial_global_step = self.state.global_step
        self._tr_loss = torch.tensor(0.0, device=self.args.device)
        self._total_loss_scalar = 0.0
        self._globalstep_last_logged = self.state.global_step
        model.zero_grad()
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        for step in range(self.state.global_step, max_steps):
            self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
            batch = self.rollout(step)
            stats = {**batch.stats, **self.optimise(model, batch), "kl_coef": self.kl_coef}
            trainer.lr_scheduler.step()
            if self.settings.kl_target is not None:
                kl = float(self.accelerator.reduce(torch.tensor(batch.stats["kl"], device=self.args.device), "mean"))
                self.kl_coef = adapt_kl_coef(self.kl_coef, kl, self.settings.kl_target, self.settings.kl_horizon,
                                             self.rollout_size * self.args.world_size)
            self._tr_loss += stats["loss"]
            self._since_log.append(stats)
            self.state.global_step += 1
            self.state.epoch = (step + 1) / per_epoch
            self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
            if self.control.should_log:
                self._log_stats(start_time)
            if self.control.should_save:
                self._save_checkpoint(model, trial)
                self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            if self.control.should_training_stop:
                break
        samples = max_steps * self.rollout_size * self.args.world_size
        return trainer._finalize_training(trial, samples, start_time)

    def _log_stats(self, start_time: float) -> None:
        """Mean of each figure over the iterations since the last log, averaged over processes."""
        keys = self._since_log[0].keys()
        local = torch.tensor([sum(s[k] for s in self._since_log) / len(self._since_log) for k in keys],
                             device=self.args.device, dtype=torch.float64)
        means = self.accelerator.reduce(local, reduction="mean").tolist()
        logs = dict(zip(keys, means, strict=True))
        logs["learning_rate"] = self._get_learning_rate()
        self._total_loss_scalar += float(self._tr_loss)
        self._tr_loss -= self._tr_loss
        self._globalstep_last_logged = self.state.global_step
        self._since_log = []
        self.log(logs, start_time)

    # -- checkpoints: the policy where a model belongs, the value model in value/ --

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / PPO_STATE).write_text(json.dumps(self.ppo_state()) + "\n")
        super()._save_checkpoint(model, trial)  # weights, optimizer, scheduler, RNG, then trainer_state.json

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        if not self.args.should_save:
            return
        out = Path(str(output_dir or self.args.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        both = self.unwrapped()
        policy_state = value_state = None
        if state_dict is not None:  # DeepSpeed gathered it from the engine
            policy_state = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
            value_state = {k.removeprefix("value."): v for k, v in state_dict.items() if k.startswith("value.")}
        both.policy.save_pretrained(str(out), state_dict=policy_state)
        both.value.save_pretrained(str(out / VALUE_DIR), state_dict=value_state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        both: Any = model if model is not None else self.model
        load_weights(both.policy, Path(resume_from_checkpoint))
        load_weights(both.value, Path(resume_from_checkpoint) / VALUE_DIR)


def load_weights(model: Any, folder: Path) -> None:
    """Load what save_pretrained wrote in `folder` (a PEFT adapter, or a whole model) into `model`."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        result: Any = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {folder} does not fit the adapter: {result.unexpected_keys[:5]}")
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied weight (an output layer sharing the embeddings) is saved once
    shared = {p.data_ptr() for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    untied = [k for k in missing if model.get_parameter(k).data_ptr() not in shared]
    if unexpected or untied:
        raise ValueError(f"checkpoint {folder} does not fit the model: missing {untied[:5]}, "
                         f"unexpected {unexpected[:5]}")


# --- held-out figures ---------------------------------------------------------------------


def encode_prompts(tokenizer: Any, texts: list[str], limit: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt, cut to its last `limit` tokens; and how many were cut.

    Special tokens are added as evals.generate adds them: not to text a chat template made.
    """
    out, cut = [], 0
    for text in texts:
        bos = tokenizer.bos_token
        templated = models.IM_START in text or (bos is not None and text.startswith(bos))
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if len(ids) > limit:
            ids, cut = ids[-limit:], cut + 1
        out.append(list(ids))
    return out, cut


@torch.no_grad()
def evaluate(
    policy: Any, reference: Callable[[], AbstractContextManager[Any]] | None, reward_model: Any, tokenizer: Any,
    pairs: list[tuple[str, str]], prompts: list[list[int]], settings: Settings, stop_ids: list[int],
) -> tuple[dict[str, float], list[str]]:
    """Held-out figures of `policy` and its greedy answers; klToReference when `reference` is given
    (a context manager factory yielding the reference model)."""
    chunk = 16
    policy.eval()
    pad = tokenizer.pad_token_id
    greedy = sample(policy, prompts, pad, stop_ids, settings.max_completion_length, None, chunk)
    texts = [tokenizer.decode(t[m.bool()], skip_special_tokens=True)
             for t, m in zip(greedy.tokens, greedy.mask, strict=True)]
    scores = torch.cat([
        final_scores(head_outputs(reward_model, part), part)
        for part in (greedy.select(slice(i, i + chunk)) for i in range(0, len(greedy), chunk))
    ])
    figures = {
        "meanReward": float(scores.mean()),
        "exactMatch": sum(evals.normalise(a) == evals.normalise(ref) for a, (_, ref) in zip(texts, pairs, strict=True))
        / len(pairs),
        "endedFraction": float(greedy.ended.float().mean()),
    }
    if reference is not None:
        sampled = sample(policy, prompts, pad, stop_ids, settings.max_completion_length, settings.temperature, chunk)
        kls = []
        for i in range(0, len(sampled), chunk):
            part = sampled.select(slice(i, i + chunk))
            lp = token_logprobs(answer_logits(policy, part, settings.temperature), part.tokens)
            with reference() as ref:
                ref_lp = token_logprobs(answer_logits(ref, part, settings.temperature), part.tokens)
            kls.append(((lp - ref_lp) * part.mask).sum(1))
        figures["klToReference"] = float(torch.cat(kls).mean())
    return figures, texts


# --- the recipe ---------------------------------------------------------------------------


def check(run: StageRun, settings: Settings, reward_uri: str | None, max_length: int) -> None:
    """Refuse what cannot work, naming the fix."""
    if reward_uri is None:
        raise ValueError(f"stage {run.stage}: a ppo stage needs a reward model; set ppo.rewardModelUri, "
                         "or put a reward stage before it")
    zero = run.distributed.deepspeed
    if zero is not None and zero.zero_stage == 3:
        raise ValueError(f"stage {run.stage}: ppo samples with the whole policy on each process; use "
                         "distributed.deepspeed.zeroStage 2 (or LoRA to fit the model), not 3")
    if run.model_uri is not None:
        config = storage.local_path(run.model_uri) / "config.json"
        architectures = (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ValueError(f"stage {run.stage} starts from a reward model ({run.model_uri}); a ppo stage's policy is "
                             "the SFT model: its modelUri must be the output of the last stage before the reward stage")
    if max_length <= settings.max_completion_length:
        raise ValueError(f"stage {run.stage}: hyperparameters.maxLength ({max_length}) must exceed "
                         f"ppo.maxCompletionLength ({settings.max_completion_length}) to leave room for the prompt")


def load_reward_model(run: StageRun, tokenizer: Any, uri: str) -> Any:
    """The reward model, frozen; it reads the policy's tokens, so it must have the policy's tokenizer."""
    model, scorer_tokenizer = models.load_scorer(run, uri)
    if scorer_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"reward model {uri} has another tokenizer than the policy; train it from the policy's model")
    return model


def keep_4bit_layout(model: Any) -> Any:
    """Keep bitsandbytes' 4-bit layers in one layout. On CPUs with AVX512-BF16, bitsandbytes (0.50)
    repacks a 4-bit layer for its inference kernel at the first eval-mode forward without grad,
    which computes differently (logits move by ~0.03), and a later state_dict (a checkpoint)
    undoes the packing lossily: the frozen base and so the reference would change. PPO compares
    log-probabilities of rollouts (no grad) with those of updates, so it keeps the training layout."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def frozen(model: Any) -> Any:
    model.eval()
    disable_dropout(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def place(model: Any, device: torch.device) -> Any:
    """Move a model to the training device (4-bit models are placed when loaded)."""
    if not getattr(model, "is_loaded_in_4bit", False) and _device(model) != device:
        model.to(device)
    return model


def run(run: StageRun, ctx: Context, settings: Settings | None = None) -> dict[str, Any]:
    hp = run.hyperparameters
    s = settings or run.settings(PpoSpec)
    reward_uri = run.reward_model_uri or s.reward_model_uri
    max_length = common.max_length(run)
    check(run, s, reward_uri, max_length)
    assert reward_uri is not None
    lora = run.tuning.method != "full"

    # --- load
    rows, held_out = common.load_data(run)

    # --- build
    models.check_tuning(run)
    tokenizer = models.load_tokenizer(run)
    stop_ids = models.end_of_turn_ids(tokenizer)
    prompts, cut = encode_prompts(tokenizer, [p for p, _ in evals.prompts_and_references(rows, tokenizer)],
                                  max_length - s.max_completion_length)
    if not prompts:
        raise ValueError(f"dataset {run.dataset.uri} has no prompts to answer")
    if cut:
        log.warning("Cut prompts to their last tokens count=%d limit=%d", cut, max_length - s.max_completion_length)
    pairs = evals.prompts_and_references(held_out[:common.EVAL_LIMIT], tokenizer)
    eval_prompts, _ = encode_prompts(tokenizer, [p for p, _ in pairs], max_length - s.max_completion_length)

    policy = models.prepare_for_kbit(models.load_model(run, tokenizer), run)
    value = models.prepare_for_kbit(models.load_model(run, tokenizer, head="reward", uri=reward_uri), run)
    reward_model = frozen(load_reward_model(run, tokenizer, reward_uri))
    reference = None
    if lora:  # the reference is the policy with its adapter disabled
        from peft import get_peft_model

        policy = get_peft_model(policy, models.peft_config(run, task_type="CAUSAL_LM"))
        value = get_peft_model(value, models.peft_config(run, task_type="SEQ_CLS"))
    else:
        reference = frozen(models.load_model(run, tokenizer, uri=run.reference_model_uri or run.model_uri))
    for m in (policy, value, reward_model):
        disable_dropout(m)
        keep_4bit_layout(m)
    both = PolicyAndValue(policy, value)

    rollout = hp.batch_size * hp.gradient_accumulation_steps * s.mini_batches
    steps = hp.max_steps or max(math.ceil(hp.epochs * len(prompts) / (rollout * ctx.world_size)), 1)
    args = common.training_args(run, ctx, TrainingArguments, max_steps=steps)
    trainer = PpoTrainer(
        model=both, args=args, processing_class=tokenizer, callbacks=ctx.callbacks, reward_model=reward_model,
        reference=reference, prompts=prompts, settings=s, stop_ids=stop_ids,
    )
    device = trainer.args.device
    for m in (reward_model, reference):
        if m is not None:
            place(m, device)

    before = answers_before = None
    if ctx.is_main and pairs:
        before, answers_before = evaluate(policy, None, reward_model, tokenizer, pairs, eval_prompts, s, stop_ids)
        log.info("Scored held-out prompts before training %s", before)
    common.barrier()

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, tokenizer)

    after = sample_row = None
    if ctx.is_main and pairs:
        trained = place(models.load_trained(run, ctx.out), device)
        after, answers_after = evaluate(trained, trainer.reference_model, reward_model, tokenizer, pairs,
                                        eval_prompts, s, stop_ids)
        assert answers_before is not None
        sample_row = {"prompt": pairs[0][0], "reference": pairs[0][1],
                      "before": answers_before[0], "after": answers_after[0]}
    result = common.report(run, ctx, trainer, before, after, sample_row, len(pairs), rl=common.rl_figures(trainer))
    result["history"] = [e for e in trainer.state.log_history if "reward" in e]  # every logging step
    return result
