"""The held-out figures of `kubetune_trainer.evals`, on cases whose answers are known by hand.

    .venv/bin/python -m pytest tests/trainer/test_evals.py

Every learning proof of the recipe tests rests on these figures, so each is checked against
an answer worked out without it: a model whose next-token distribution is uniform (its output
layer zeroed: every token has probability 1/V), log-probabilities summed one sequence at a
time by a plain loop, DPO margins computed by hand, and the session's fine-tuned model
re-scored with the synthetic task's own checker.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer import evals, models
from kubetune_trainer.data import synthetic as task

PROMPTS = ["a b c reversed:", "q w e r first letter:", "z y in capitals:", "m n o p q last letter:"]
ANSWERS = [" c b a", " q", " Z Y", " q"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on the puzzles (the trainer's own tokenizer builder)."""
    rows = task.sft_rows(task.puzzle_split(seed=3, n_train=300, n_val=10)[0])
    return models.train_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=300)


def tiny_llama(tokenizer: Any, seed: int = 0, kind: str = "causal") -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         num_labels=1)
    cls = LlamaForCausalLM if kind == "causal" else LlamaForSequenceClassification
    return cls(config).eval()


def uniform_llama(tokenizer: Any) -> Any:
    """A causal LM whose logits are all zero: p(token) = 1/V at every position."""
    model = tiny_llama(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


# --- text handling ------------------------------------------------------------------------


def test_split_conversation_takes_the_last_assistant_answer() -> None:
    user = {"role": "user", "content": "a b reversed:"}
    first, last = {"role": "assistant", "content": "b a"}, {"role": "assistant", "content": "B A"}
    again = {"role": "user", "content": "in capitals:"}

    assert evals.split_conversation([user, first, again, last]) == ([user, first, again], "B A")
    assert evals.split_conversation([user, first, again]) == ([user], "b a")
    assert evals.split_conversation([user]) is None  # nothing to score
    assert evals.split_conversation([first]) is None  # an answer with no prompt before it
    assert evals.split_conversation([user, {"role": "assistant", "content": ""}]) is None


def test_prompts_and_references_of_each_sft_format(tokenizer: Any) -> None:
    rows = [
        {"prompt": "a b reversed:", "completion": " b a"},
        {"messages": [{"role": "user", "content": "c d reversed:"}, {"role": "assistant", "content": "d c"}]},
        {"text": "no answer in plain text"},
    ]

    pairs = evals.prompts_and_references(rows, tokenizer)

    assert pairs == [
        ("a b reversed:", " b a"),
        ("<|im_start|>user\nc d reversed:<|im_end|>\n<|im_start|>assistant\n", "d c"),
    ]
    assert evals.normalise("  d   c \n") == "d c"


# --- DPO's preference figures ---------------------------------------------------------------


def test_preference_accuracy_by_hand() -> None:
    # (policy chosen, policy rejected, reference chosen, reference rejected) per pair; beta 0.5
    pairs = [(-1.0, -3.0, -2.0, -2.0),  # margin 0.5 * ((-1 + 2) - (-3 + 2)) = +1.0: right
             (-2.0, -2.0, -2.0, -2.0),  # margin 0: a tie, one half
             (-4.0, -1.0, -2.0, -2.0),  # margin 0.5 * (-2 - 1) = -1.5: wrong
             (-1.0, -2.0, -1.0, -2.0)]  # the policy prefers chosen, but no more than the reference: a tie
    policy = ([p[0] for p in pairs], [p[1] for p in pairs])
    reference = ([p[2] for p in pairs], [p[3] for p in pairs])

    figures = evals.preference_accuracy(policy, reference, beta=0.5)

    assert figures["preferenceAccuracy"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert figures["rewardMargin"] == pytest.approx((1.0 + 0 - 1.5 + 0) / 4)
    assert figures["chosenLogpHigher"] == pytest.approx(2 / 4)  # pairs 1 and 4


def test_an_untrained_policy_scores_one_half_with_no_margin() -> None:
    logps = ([-1.0, -5.0, -2.5], [-3.0, -1.0, -2.5])

    figures = evals.preference_accuracy(logps, logps, beta=0.1)

    assert figures["preferenceAccuracy"] == 0.5 and figures["rewardMargin"] == 0.0


# --- log-probabilities and loss -------------------------------------------------------------


def test_eval_loss_of_a_uniform_model_is_log_vocabulary_size(tokenizer: Any) -> None:
    texts = [p + a for p, a in zip(PROMPTS, ANSWERS, strict=True)]  # of different lengths: padding is masked

    loss = evals.eval_loss(uniform_llama(tokenizer), tokenizer, texts, max_length=64, batch_size=3)

    assert loss == pytest.approx(math.log(len(tokenizer)), rel=1e-5)


def test_eval_loss_is_the_mean_over_every_token_of_every_text(tokenizer: Any) -> None:
    """A random model, texts batched with padding and cut at max_length: the mean of -log p over
    all predicted tokens, end-of-sequence included, computed one text at a time."""
    model, max_length = tiny_llama(tokenizer, seed=5), 10
    texts = [p + a for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    nll: list[float] = []
    for text in texts:
        ids = torch.tensor([tokenizer(text + tokenizer.eos_token)["input_ids"][:max_length]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        nll.extend(-float(logp[i - 1, ids[0, i]]) for i in range(1, ids.shape[1]))

    loss = evals.eval_loss(model, tokenizer, texts, max_length=max_length, batch_size=3)

    assert loss == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    assert min(n_tokens(tokenizer, t) for t in texts) < max_length < max(n_tokens(tokenizer, t) for t in texts)


def test_completion_logps_of_a_uniform_model_count_completion_tokens(tokenizer: Any) -> None:
    """Only the completion's tokens (and the end-of-sequence token after them) are scored."""
    model, log_v = uniform_llama(tokenizer), math.log(len(tokenizer))
    counts = [n_tokens(tokenizer, p + a) - n_tokens(tokenizer, p) for p, a in zip(PROMPTS, ANSWERS, strict=True)]

    with_eos = evals.completion_logps(model, tokenizer, PROMPTS, ANSWERS, batch_size=3)
    without = evals.completion_logps(model, tokenizer, PROMPTS, ANSWERS, batch_size=3, add_eos=False)

    assert with_eos == pytest.approx([-(n + 1) * log_v for n in counts], rel=1e-5)
    assert without == pytest.approx([-n * log_v for n in counts], rel=1e-5)
    assert min(counts) >= 1


def test_completion_logps_equal_a_plain_sum_over_one_sequence_at_a_time(tokenizer: Any) -> None:
    """A random model, prompts of different lengths batched with padding: each figure equals
    the sum of log p(token | everything before it) over the completion, computed unbatched."""
    model = tiny_llama(tokenizer, seed=1)
    eos = tokenizer.eos_token

    def by_hand(prompt: str, completion: str) -> float:
        start = n_tokens(tokenizer, prompt)
        ids = torch.tensor([tokenizer(prompt + completion + eos)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        return sum(float(logp[i - 1, ids[0, i]]) for i in range(start, ids.shape[1]))

    batched = evals.completion_logps(model, tokenizer, PROMPTS, ANSWERS, batch_size=4)

    assert batched == pytest.approx([by_hand(p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)], abs=1e-4)
    assert len(set(round(x, 3) for x in batched)) == len(batched)  # a random model tells them apart


def test_preference_logps_read_completions_as_text_or_assistant_messages(tokenizer: Any) -> None:
    model = tiny_llama(tokenizer, seed=2)
    as_text = [{"prompt": PROMPTS[0], "chosen": " c b a", "rejected": " a b c"}]
    as_messages = [{"prompt": PROMPTS[0], "chosen": [{"role": "assistant", "content": " c b a"}],
                    "rejected": [{"role": "assistant", "content": " a b c"}]}]

    chosen, rejected = evals.preference_logps(model, tokenizer, as_text)

    assert evals.preference_logps(model, tokenizer, as_messages) == (chosen, rejected)
    assert chosen == evals.completion_logps(model, tokenizer, [PROMPTS[0]], [" c b a"])
    assert chosen != rejected


# --- reward models --------------------------------------------------------------------------


def test_reward_scores_do_not_depend_on_batching(tokenizer: Any) -> None:
    model = tiny_llama(tokenizer, seed=3, kind="reward")
    texts = [p + a + tokenizer.eos_token for p, a in zip(PROMPTS, ANSWERS, strict=True)]

    batched = evals.rewards(model, tokenizer, texts, batch_size=4)
    alone = [evals.rewards(model, tokenizer, [t], batch_size=1)[0] for t in texts]

    assert batched == pytest.approx(alone, abs=1e-4)


def test_pairwise_accuracy_of_swapped_pairs_is_the_complement(tokenizer: Any) -> None:
    model = tiny_llama(tokenizer, seed=4, kind="reward")
    wrong = [" a b c", " w", " z y", " m"]
    rows = [{"prompt": p, "chosen": a, "rejected": w} for p, a, w in zip(PROMPTS, ANSWERS, wrong, strict=True)]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]

    acc, chosen, rejected = evals.pairwise_accuracy(model, tokenizer, rows)
    acc_swapped, *_ = evals.pairwise_accuracy(model, tokenizer, swapped)

    expected = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    assert acc == expected and acc + acc_swapped == pytest.approx(1.0)
    eos = tokenizer.eos_token
    assert chosen == pytest.approx(evals.rewards(model, tokenizer, [p + a + eos for p, a in zip(PROMPTS, ANSWERS, strict=True)]))
    # a score head that says nothing ranks no pair: ties are not wins
    with torch.no_grad():
        model.score.weight.zero_()
    assert evals.pairwise_accuracy(model, tokenizer, rows)[0] == 0.0


# --- exact match, against the synthetic task's own checker -----------------------------------


def test_exact_match_of_the_trained_sft_model_agrees_with_the_tasks_checker(
    sft_model: tuple[Path, dict[str, Any]], synthetic: dict[str, Path],
) -> None:
    """Re-score the session's fine-tuned model on its held-out puzzles: exact_match's figure is
    the share of answers `synthetic.is_correct` accepts, and the one the recipe reported."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics = sft_model
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in synthetic["sft/validation"].read_text().splitlines()][:200]
    pairs = evals.prompts_and_references(rows, tok)

    accuracy, answers = evals.exact_match(model, tok, pairs)

    checked = [task.is_correct(r["prompt"], a) for r, a in zip(rows, answers, strict=True)]
    assert accuracy == pytest.approx(sum(checked) / len(rows))
    assert accuracy == pytest.approx(metrics["after"]["exactMatch"])
    assert accuracy > 0.5  # the model learned: the two scorers agree on many right answers
    # a wrong reference is matched only by a wrong answer
    rng = random.Random(0)
    wrong = [(p, " " + task.wrong_answer(r["prompt"], rng)) for (p, _), r in zip(pairs, rows, strict=True)]
    miss, _ = evals.exact_match(model, tok, wrong)
    assert miss <= 1 - accuracy
