"""Held-out figures each recipe reports before and after training (run on one process, rank 0).

    eval_loss            pretrain: mean next-token loss on held-out text
    exact_match          sft: greedy answers to held-out prompts equal the reference completion
    pairwise_accuracy    reward: the chosen answer scores above the rejected one
    preference_accuracy  dpo: the implicit reward beta*(log pi - log pi_ref) ranks chosen above rejected
    completion_logps     kto: mean log-probability of desirable (and undesirable) completions

Exact match compares whitespace-normalised strings, which for kubetune's synthetic letter
puzzles is what `kubetune_trainer.data.synthetic.is_correct` checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from kubetune_trainer import models


def normalise(text: str) -> str:
    return " ".join(text.split())


def _device(model: Any) -> torch.device:
    device: torch.device = next(model.parameters()).device
    return device


def _on_device(model: Any) -> Any:
    """Move a CPU model to this process's GPU when there is one (quantized models are placed already)."""
    if torch.cuda.is_available() and _device(model).type == "cpu" and not getattr(model, "is_loaded_in_4bit", False):
        model.to(torch.device("cuda", torch.cuda.current_device()))
    return model


class _Eval:
    """eval mode and no grad for the duration; the training mode is restored after."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> Any:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return _on_device(self.model)

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


# --- prompts ------------------------------------------------------------------------------


def prompt_text(tokenizer: Any, prompt: Any) -> str:
    """A prompt as the model sees it: plain text as is, a list of messages through the chat template."""
    if isinstance(prompt, str):
        return prompt
    return str(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))


def split_conversation(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str] | None:
    """(messages before the last assistant turn, its content), or None when it has no answer to score."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.get("role") == "assistant":
            return (messages[:i], m.get("content") or "") if i > 0 and m.get("content") else None
    return None


def prompts_and_references(rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[tuple[str, str]]:
    """(prompt text, reference answer) of held-out sft rows; text rows have none."""
    pairs = []
    for row in rows:
        if "messages" in row:
            split = split_conversation(row["messages"])
            if split:
                pairs.append((prompt_text(tokenizer, split[0]), split[1]))
        elif "prompt" in row and "completion" in row:
            pairs.append((prompt_text(tokenizer, row["prompt"]), str(row["completion"])))
    return pairs


# --- generation ---------------------------------------------------------------------------


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of each prompt."""
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stop = models.end_of_turn_ids(tokenizer)
    try:
        with _Eval(model) as m:
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i:i + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not _templated(tokenizer, chunk[0]))
                enc = {k: v.to(_device(m)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out = m.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                )
                for seq in out[:, enc["input_ids"].shape[1]:]:
                    outputs.append(tokenizer.decode(seq, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outputs


def _templated(tokenizer: Any, text: str) -> bool:
    """True when text came out of a chat template, which already holds any BOS token."""
    return models.IM_START in text or (tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token))


def exact_match(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> tuple[float, list[str]]:
    """Share of greedy answers equal to the reference, and the answers."""
    if not pairs:
        return math.nan, []
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in pairs)
    answers = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=longest + 4)
    hits = sum(normalise(a) == normalise(ref) for a, (_, ref) in zip(answers, pairs, strict=True))
    return hits / len(pairs), answers


def exact_match_after(
    run: Any, out: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], answers_before: Sequence[str],
) -> tuple[dict[str, float], dict[str, Any]]:
    """The trained model's held-out exact match (reloaded from the stage folder `out`), and a sample:
    the first prompt, its reference, and the answers before and after (sft and grpo report these)."""
    accuracy, answers_after = exact_match(models.load_trained(run, out), tokenizer, pairs)
    sample = {"prompt": pairs[0][0], "reference": pairs[0][1], "before": answers_before[0], "after": answers_after[0]}
    return {"exactMatch": accuracy}, sample


# --- log-probabilities --------------------------------------------------------------------


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def completion_logps(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16,
    add_eos: bool = True,
) -> list[float]:
    """Sum of log p(completion tokens | prompt) per example, tokenised the way TRL's DPO/KTO trainers do."""
    seqs: list[tuple[list[int], int]] = []
    eos = tokenizer.eos_token if add_eos else ""
    for p, c in zip(prompts, completions, strict=True):
        templated = _templated(tokenizer, p)
        p_ids = tokenizer(p, add_special_tokens=not templated)["input_ids"]
        full = tokenizer(p + c + (eos if not c.endswith(eos) else ""), add_special_tokens=not templated)["input_ids"]
        seqs.append((full, min(_common_prefix(p_ids, full), len(p_ids))))
    result: list[float] = []
    pad = tokenizer.pad_token_id or 0
    with _Eval(model) as m:
        device = _device(m)
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for j, (seq, start) in enumerate(chunk):
                ids[j, :len(seq)] = torch.tensor(seq)
                attn[j, :len(seq)] = 1
                mask[j, start:len(seq)] = True
            ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
            logits = m(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            result.extend((logp * mask[:, 1:]).sum(-1).tolist())
    return result


def eval_loss(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 16) -> float:
    """Mean next-token loss (nats per token) over held-out texts, each ending in eos, truncated to max_length."""
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id or 0
    with _Eval(model) as m:
        device = _device(m)
        encoded = [tokenizer(t + tokenizer.eos_token)["input_ids"][:max_length] for t in texts]
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
                attn[j, :len(s)] = 1
            ids, attn = ids.to(device), attn.to(device)
            logits = m(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            keep = attn[:, 1:].bool()
            total += float(nll[keep].sum())
            count += int(keep.sum())
    return total / max(count, 1)


# --- preference figures -------------------------------------------------------------------


def rewards(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> list[float]:
    """Scalar scores of a sequence-classification reward model (right padding, as TRL trains it)."""
    out: list[float] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with _Eval(model) as m:
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True)
                enc = {k: v.to(_device(m)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out.extend(m(**enc).logits[:, 0].float().tolist())
    finally:
        tokenizer.padding_side = side
    return out


def pairwise_accuracy(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> tuple[float, list[float], list[float]]:
    """Share of held-out pairs whose chosen text scores above the rejected one; and the scores."""
    eos = tokenizer.eos_token or ""
    prompts = [prompt_text(tokenizer, r["prompt"]) for r in rows]
    chosen = rewards(model, tokenizer, [p + completion_text(r["chosen"]) + eos for p, r in zip(prompts, rows, strict=True)])
    rejected = rewards(model, tokenizer, [p + completion_text(r["rejected"]) + eos for p, r in zip(prompts, rows, strict=True)])
    acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(len(rows), 1)
    return acc, chosen, rejected


def completion_text(completion: Any) -> str:
    """A completion as text: strings as is, an assistant message list as its contents."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


def preference_logps(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """log p(chosen | prompt) and log p(rejected | prompt) per held-out pair."""
    prompts = [prompt_text(tokenizer, r["prompt"]) for r in rows]
    chosen = completion_logps(model, tokenizer, prompts, [completion_text(r["chosen"]) for r in rows])
    rejected = completion_logps(model, tokenizer, prompts, [completion_text(r["rejected"]) for r in rows])
    return chosen, rejected


def preference_accuracy(
    policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]], beta: float,
) -> dict[str, float]:
    """DPO's implicit-reward accuracy (ties, as before any training, count one half) and mean margin."""
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, pr, rc, rr in zip(policy[0], policy[1], reference[0], reference[1], strict=True)
    ]
    n = max(len(margins), 1)
    acc = sum(1.0 if m > 1e-4 else 0.5 if abs(m) <= 1e-4 else 0.0 for m in margins) / n
    chosen_higher = sum(c > r for c, r in zip(policy[0], policy[1], strict=True)) / n
    return {"preferenceAccuracy": acc, "rewardMargin": sum(margins) / n, "chosenLogpHigher": chosen_higher}
