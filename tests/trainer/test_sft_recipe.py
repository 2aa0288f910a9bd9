"""SFT: prompt-completion learning proof; messages with system turns and tool calls; LoRA, DoRA, packing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.api import StageRun
from kubetune_trainer import models
from trainer_helpers import Trainer, report, weights

CONVERSATION = [
    {"role": "system", "content": "You solve letter puzzles."},
    {"role": "user", "content": "Reverse: a b c ="},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "solve_puzzle", "arguments": {"task": "reverse"}}},
    ]},
    {"role": "tool", "tool_call_id": "call_0", "name": "solve_puzzle", "content": "c b a"},
    {"role": "assistant", "content": "c b a"},
]


@pytest.mark.slow
def test_sft_raises_exact_match_on_held_out_prompts(sft_model: tuple[Path, dict[str, Any]]) -> None:
    out, metrics = sft_model
    report("sft (promptCompletion, full)", metrics)
    assert metrics["before"]["exactMatch"] <= 0.05
    assert metrics["after"]["exactMatch"] >= 0.5
    assert metrics["heldOutExamples"] == 200
    assert set(metrics["sample"]) == {"prompt", "reference", "before", "after"}


def test_default_chat_template_masks_all_but_assistant_turns(pretrained: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pretrained[0])
    assert tokenizer.chat_template == models.CHATML_TEMPLATE
    enc = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou solve letter puzzles.<|im_end|>\n<|im_start|>user\n")
    assert '<tool_call>{"name": "solve_puzzle", "arguments": {"task": "reverse"}}</tool_call>' in text
    assert "<|im_start|>tool\nc b a<|im_end|>" in text
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == ('<tool_call>{"name": "solve_puzzle", "arguments": {"task": "reverse"}}</tool_call>'
                       "<|im_end|>c b a<|im_end|>")
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=False)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False).startswith(prompt)


def test_lora_on_messages_trains_adapters_only_and_merges(trainer: Trainer, pretrained: tuple[Path, dict[str, Any]]) -> None:
    run = trainer.stage_run(
        "chat", "sft", "messages", "sft_messages", model=pretrained[0],
        tuning={"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        hp={"maxSteps": 8, "learningRate": 2e-3, "maxLength": 64}, merge=True,
    )
    metrics = trainer.train(run)
    out = Path(run["outputUri"])
    base = weights(pretrained[0])
    adapter = weights(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    assert adapter and all("lora_" in k for k in adapter)
    # all-linear: attention and MLP projections of both layers, not the output head
    adapted = {k.split(".")[-3] for k in adapter}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at zero: it trained

    merged = weights(out / "merged")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # embeddings, norms, head: frozen
    assert (out / "merged" / "tokenizer.json").exists() and (out / "tokenizer.json").exists()
    assert metrics["method"] == "lora" and metrics["after"] is not None


def test_dora_on_chosen_modules(trainer: Trainer, pretrained: tuple[Path, dict[str, Any]]) -> None:
    run = trainer.stage_run(
        "dora", "sft", "promptCompletion", "sft", model=pretrained[0], validation=False,
        tuning={"method": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"], "useDora": True}},
        hp={"maxSteps": 3, "learningRate": 1e-3},
    )
    trainer.train(run)
    adapter = weights(Path(run["outputUri"]))
    assert {k.split(".")[-3] if "lora_magnitude" not in k else k.split(".")[-2] for k in adapter} == {"q_proj", "v_proj"}
    assert any("lora_magnitude_vector" in k for k in adapter)
    assert not (Path(run["outputUri"]) / "merged").exists()  # merge is off: the adapter alone


@pytest.mark.parametrize("fmt,data", [("promptCompletion", "sft"), ("text", "pretrain")])
def test_packing(trainer: Trainer, pretrained: tuple[Path, dict[str, Any]], fmt: str, data: str) -> None:
    run = trainer.stage_run("packed", "sft", fmt, data, model=pretrained[0], validation=False,
                            hp={"maxSteps": 3, "packing": True, "maxLength": 64, "learningRate": 1e-3})
    metrics = trainer.train(run)
    assert metrics["globalStep"] == 3 and 0 < metrics["trainLoss"] < 10
    # packed sequences hold several rows: 3 steps of 16 sequences saw far more than 16 rows' worth of tokens
    assert metrics["tokensSeen"] > 3 * 16 * 20
    # on CPU the fast path is fused AdamW alone (what it runs is written down)
    assert metrics["fastPath"] == {"fusedAdamW": True, "liger": False, "flashAttention": False, "packing": False}


def fast_path_of(trainer: Trainer, type_: str, fmt: str, data: str, **hp: Any) -> models.FastPath:
    run = StageRun.model_validate(trainer.stage_run("fast", type_, fmt, data, model="/models/base", hp=hp))
    return models.fast_path(run)


def test_the_fast_path_turns_on_what_the_node_has_and_is_off_with_its_switch(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The decision alone (no GPU here: bench/gpu.py measures it on one). On CPU: fused AdamW only. On CUDA
    with liger-kernel and flash-attn installed: everything, packing for SFT only, Liger and flash attention
    for text models only, flash attention only in 16 bits; fastPath false: nothing, fused AdamW included."""
    from kubetune_trainer import common
    from trl import SFTConfig

    cpu = fast_path_of(trainer, "sft", "promptCompletion", "sft")
    assert cpu == models.FastPath(fused_adamw=True, liger=False, flash_attention=False, packing=False)
    run = trainer.stage_run("fast", "sft", "promptCompletion", "sft", model="/models/base", hp={"fastPath": False})
    args = common.training_args(StageRun.model_validate(run), common.Context(out=trainer.root / "fast"), SFTConfig)
    assert (args.optim, args.use_liger_kernel) == ("adamw_torch", False)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models, "installed", lambda package: package in ("liger_kernel", "flash_attn"))
    assert fast_path_of(trainer, "sft", "promptCompletion", "sft", precision="bf16") == models.FastPath(
        fused_adamw=True, liger=True, flash_attention=True, packing=True)
    assert fast_path_of(trainer, "dpo", "preference", "preference", precision="bf16") == models.FastPath(
        fused_adamw=True, liger=True, flash_attention=True, packing=False)
    assert fast_path_of(trainer, "sft", "promptCompletion", "sft", precision="fp32").flash_attention is False
    assert fast_path_of(trainer, "sft", "promptCompletion", "sft", precision="bf16", fastPath=False) == models.FastPath(
        fused_adamw=False, liger=False, flash_attention=False, packing=False)
    monkeypatch.setattr(models, "installed", lambda package: False)
    assert fast_path_of(trainer, "sft", "promptCompletion", "sft", precision="bf16") == models.FastPath(
        fused_adamw=True, liger=False, flash_attention=False, packing=False)
