"""The tuning methods beside LoRA: IA3, prompt tuning, prefix tuning and bottleneck adapters.

Each one starts from the session's fine-tuned model (`sft_model`: full SFT on the letter
puzzles) and learns the first-letter task behind a cue it never saw (`sft_cue`: "q w e =" ->
" q"). That is what these methods are for: steering a model that has a skill. On the
pretrained-only tiny model, which must learn the skill itself, prompt and prefix tuning stay at
0.00 exact match after 1000 steps while LoRA reaches 0.9 (measured; see the issue note).

For each method the test checks that it learned (held-out exact match up by the stated margin),
that only its own parameters trained (counted from the saved adapter and the config, and the
frozen weights compared where the output holds them), and that the saved adapter, reloaded the
way a user would, gives the same held-out answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer import bottleneck, evals, models
from trainer_helpers import Trainer, report, weights

HIDDEN, LAYERS, INTERMEDIATE = 64, 2, 192  # TINY_INIT's llama: hidden 64, 2 layers, gated MLP 192 wide

# method: (tuning, hyperparameters, margin of held-out exact match over the model it started from,
#          trainable parameters of the tiny llama)
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any], float, int]] = {
    "lora": ({"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}, {"learningRate": 4e-3}, 0.8,
             LAYERS * (4 * 8 * (HIDDEN + HIDDEN) + 3 * 8 * (HIDDEN + INTERMEDIATE))),
    "ia3": ({"method": "ia3"}, {"learningRate": 5e-2}, 0.8,
            LAYERS * (HIDDEN + HIDDEN + INTERMEDIATE)),  # keys, values, down_proj's input
    "promptTuning": ({"method": "promptTuning", "promptTuning": {"numVirtualTokens": 8, "initText": "first letter:"}},
                     {"learningRate": 1e-1, "maxSteps": 600}, 0.1, 8 * HIDDEN),  # 8 vectors: 0.06 -> 0.2 here
    "prefixTuning": ({"method": "prefixTuning", "prefixTuning": {"numVirtualTokens": 20}}, {"learningRate": 3e-2}, 0.7,
                     20 * LAYERS * 2 * HIDDEN),  # a key and a value prefix per layer
    "adapter": ({"method": "adapter", "adapter": {"reductionFactor": 16}}, {"learningRate": 1e-2}, 0.8,
                LAYERS * 2 * (HIDDEN * 4 + 4 + 4 * HIDDEN + HIDDEN)),  # houlsby: 2 per layer, bottleneck 4
}


@pytest.fixture(scope="module")
def figures() -> Iterator[dict[str, tuple[int, float, float]]]:
    """method -> (trainable parameters, exact match before, after), printed as a table at the end."""
    table: dict[str, tuple[int, float, float]] = {}
    yield table
    print("\nmethod         trainable  exactMatch before -> after  (sft_cue held-out, from the SFT model)")
    for name, (n, before, after) in table.items():
        print(f"{name:<14} {n:>9}  {before:.3f} -> {after:.3f}")


def reloaded_answers(spec: dict[str, Any], sft: Path) -> tuple[float, list[str]]:
    """Held-out exact match and answers of the stage's output, reloaded the way a user would."""
    from transformers import AutoTokenizer

    out = Path(spec["outputUri"])
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    rows = [json.loads(line) for line in Path(spec["dataset"]["validationUri"]).read_text().splitlines()]
    return evals.exact_match(reload(sft, out), tokenizer, evals.prompts_and_references(rows[:200], tokenizer))


def reload(sft: Path, out: Path) -> Any:
    """The stage's output loaded the way a user would: the base model, then the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    if bottleneck.is_adapter(out):
        return bottleneck.load(base, out)
    return models.generation_ready(PeftModel.from_pretrained(base, str(out)))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_its_own_parameters_and_learns_the_cue(
    method: str, trainer: Trainer, sft_model: tuple[Path, dict[str, Any]], figures: dict[str, tuple[int, float, float]],
) -> None:
    tuning, hp, margin, trainable = METHODS[method]
    sft = sft_model[0]
    spec = trainer.stage_run(method, "sft", "promptCompletion", "sft_cue", model=sft, tuning=tuning,
                             hp={"maxSteps": 300, "batchSize": 32, "loggingSteps": 50, "saveSteps": 300, **hp})
    metrics = trainer.train(spec)
    out = Path(spec["outputUri"])
    before, after = metrics["before"]["exactMatch"], metrics["after"]["exactMatch"]
    figures[method] = (metrics["trainableParameters"], before, after)

    # learned: the held-out cue answered, well above the model it started from
    assert after - before >= margin, (before, after)

    # only its own parameters: the count, and the adapter file holds exactly those
    assert metrics["trainableParameters"] == trainable
    if method == "adapter":
        saved = weights(out)  # bottleneck_adapter.safetensors
        assert json.loads((out / bottleneck.CONFIG_FILE).read_text())["placement"] == "houlsby"
        # the checkpoint has the whole model: every base weight as it was
        base, checkpoint = weights(sft), weights(out / "checkpoint-300")
        assert all(torch.equal(base[k], checkpoint[k]) for k in base)
        assert {k for k in checkpoint if k not in base} == {f"{bottleneck.ROOT}.{k}" for k in saved}
    else:
        saved = weights(out)  # adapter_model.safetensors
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == {"lora": "LORA", "ia3": "IA3", "promptTuning": "PROMPT_TUNING",
                                       "prefixTuning": "PREFIX_TUNING"}[method]
        assert not (out / "model.safetensors").exists()
    assert sum(t.numel() for t in saved.values()) == trainable

    # reloaded from disk, the same held-out answers
    accuracy, answers = reloaded_answers(spec, sft)
    assert accuracy == after
    assert answers[0] == metrics["sample"]["after"]


@pytest.mark.slow
def test_ia3_merges_into_the_weights_it_rescales(trainer: Trainer, sft_model: tuple[Path, dict[str, Any]]) -> None:
    """IA3 folds into the weights (so a next stage or vLLM gets a plain model); the rest stay as they were."""
    tuning, hp, _, _ = METHODS["ia3"]
    sft = sft_model[0]
    spec = trainer.stage_run("ia3-merged", "sft", "promptCompletion", "sft_cue", model=sft, tuning=tuning,
                             hp={"maxSteps": 100, "batchSize": 32, **hp}, merge=True)
    metrics = trainer.train(spec)
    out = Path(spec["outputUri"])
    base, merged = weights(sft), weights(out / "merged")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert {k.split(".")[-2] for k in changed} == {"k_proj", "v_proj", "down_proj"}
    # the recipe measured the merged model; the adapter on its base answers the same
    accuracy, _ = reloaded_answers(spec, sft)
    assert accuracy == metrics["after"]["exactMatch"]


@pytest.mark.slow
def test_ia3_dpo_raises_preference_accuracy_with_the_base_as_reference(
    trainer: Trainer, sft_model: tuple[Path, dict[str, Any]],
) -> None:
    """DPO with IA3: the reference is the base with the adapter disabled (as with LoRA), and the
    (IA)3 vectors alone move the held-out preference accuracy off the 0.5 tie."""
    spec = trainer.stage_run("ia3-dpo", "dpo", "preference", "preference", model=sft_model[0], tuning={"method": "ia3"},
                             hp={"maxSteps": 60, "learningRate": 5e-2, "loggingSteps": 20})
    metrics = trainer.train(spec)
    report("dpo ia3", metrics)
    assert metrics["before"]["preferenceAccuracy"] == pytest.approx(0.5, abs=0.05)  # policy == reference
    assert metrics["after"]["preferenceAccuracy"] >= 0.7 and metrics["after"]["rewardMargin"] > 0
    assert metrics["trainableParameters"] == LAYERS * (HIDDEN + HIDDEN + INTERMEDIATE)
    config = json.loads((Path(spec["outputUri"]) / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"


@pytest.mark.slow
@pytest.mark.parametrize(("method", "steps"), [("promptTuning", 300), ("adapter", 20)])
def test_a_stage_after_an_unmergeable_method_keeps_training_its_adapter(
    method: str, steps: int, trainer: Trainer, sft_model: tuple[Path, dict[str, Any]],
) -> None:
    """A prompt or a bottleneck adapter cannot be merged into the model, so the next stage starts from
    base + that adapter (StageRun.adapterUri) and trains it further: it starts where the first ended."""
    tuning, hp, _, trainable = METHODS[method]
    sft = sft_model[0]
    first = trainer.stage_run(f"{method}-1", "sft", "promptCompletion", "sft_cue", model=sft, tuning=tuning,
                              hp={"batchSize": 32, **hp, "maxSteps": steps})
    before = trainer.train(first)
    second = trainer.stage_run(f"{method}-2", "sft", "promptCompletion", "sft_cue", model=sft, tuning=tuning,
                               hp={"batchSize": 32, **hp, "maxSteps": steps}, adapterUri=first["outputUri"])
    after = trainer.train(second)
    report(f"{method}, continued", after)

    assert after["before"]["exactMatch"] == before["after"]["exactMatch"]  # the first stage's adapter, reloaded
    assert after["after"]["exactMatch"] > after["before"]["exactMatch"]
    assert after["trainableParameters"] == trainable  # the same adapter, nothing else
    first_weights, second_weights = weights(Path(first["outputUri"])), weights(Path(second["outputUri"]))
    assert first_weights.keys() == second_weights.keys()
    assert any(not torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
