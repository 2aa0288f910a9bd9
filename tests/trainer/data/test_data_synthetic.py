"""The synthetic task: files of every format, held-out prompts unseen, answers scored right,
and a corpus a tiny model learns from."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.data import validate
from kubetune_trainer.data.synthetic import answer, is_correct, main, make_all, parse_prompt, wrong_answer

FORMAT_OF = {"pretrain": "text", "sft": "promptCompletion", "sft_cue": "promptCompletion", "sft_messages": "messages",
             "preference": "preference", "kto": "unpairedPreference"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("synthetic"), seed=3)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_file_is_valid_in_its_format(files: dict[str, Path]) -> None:
    assert set(files) == {f"{name}/{split}" for name in FORMAT_OF for split in ("train", "validation")}
    for key, path in files.items():
        report = validate(str(path), FORMAT_OF[key.split("/")[0]])
        assert report.ok, (key, report.format_text())
        assert report.rows >= (1500 if key.endswith("train") else 150), key


def prompts_of(key: str, files: dict[str, Path]) -> set[str]:
    rows = read(files[key])
    if "messages" in rows[0]:
        return {t["content"] for r in rows for t in r["messages"] if t["role"] == "user"}
    return {r["prompt"] for r in rows}


def test_held_out_prompts_appear_in_no_training_file(files: dict[str, Path]) -> None:
    train = set().union(*(prompts_of(f"{n}/train", files) for n in FORMAT_OF if n != "pretrain"))
    corpus = " ".join(r["text"] for r in read(files["pretrain/train"]))
    for name in ("sft", "sft_messages", "preference", "kto"):
        held_out = prompts_of(f"{name}/validation", files)
        assert len(held_out) >= 150 and not held_out & train, name
        letter_strings = {" ".join(parse_prompt(p)[1]) for p in held_out}
        assert not [s for s in letter_strings if s in corpus], name
    assert prompts_of("sft/validation", files) == prompts_of("preference/validation", files)
    cue = prompts_of("sft_cue/validation", files)
    assert len(cue) >= 150 and not cue & prompts_of("sft_cue/train", files)


def test_answers_are_scored_by_exact_match(files: dict[str, Path]) -> None:
    assert answer("q w e in capitals:") == "Q W E"
    assert answer("q w e reversed:") == "e w q"
    assert answer("q w e r first letter:") == "q"
    assert answer("q w e r last letter:") == "r"
    assert is_correct("q w e reversed:", " e  w q\n") and not is_correct("q w e reversed:", "e w q r")
    with pytest.raises(ValueError, match="not a synthetic puzzle prompt"):
        answer("Q W E reversed:")
    for row in read(files["sft/train"]) + read(files["sft/validation"]):
        assert is_correct(row["prompt"], row["completion"])
    for row in read(files["preference/train"]):
        assert is_correct(row["prompt"], row["chosen"]) and not is_correct(row["prompt"], row["rejected"])
    labels = [row["label"] for row in read(files["kto/train"])]
    assert 0.35 < sum(labels) / len(labels) < 0.65
    for row in read(files["kto/train"]):
        assert is_correct(row["prompt"], row["completion"]) == row["label"]
    rng = random.Random(0)
    for prompt in ("a a a reversed:", "b b b first letter:", "z z z in capitals:", "m n m reversed:"):
        assert not is_correct(prompt, wrong_answer(prompt, rng))


def test_conversations_have_system_turns_several_puzzles_and_tool_calls(files: dict[str, Path]) -> None:
    rows = read(files["sft_messages/train"])
    roles = [[t["role"] for t in r["messages"]] for r in rows]
    assert any(r[0] == "system" for r in roles)
    assert any(r.count("user") == 2 for r in roles)
    with_tools = [r["messages"] for r in rows if "tool" in [t["role"] for t in r["messages"]]]
    assert len(with_tools) > 50
    for turns in with_tools:
        call = next(t for t in turns if t.get("tool_calls"))["tool_calls"][0]
        tool = next(t for t in turns if t["role"] == "tool")
        assert json.loads(call["function"]["arguments"])["task"] and tool["tool_call_id"] == call["id"]
    for r in rows:
        user = [t["content"] for t in r["messages"] if t["role"] == "user"][-1]
        assert is_correct(user, r["messages"][-1]["content"])


def test_the_same_seed_writes_the_same_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "a"), "--seed", "5", "--train", "300", "--validation", "30"]) == 0
    assert "Wrote sft/train" in capsys.readouterr().out
    again = make_all(tmp_path / "b", seed=5, n_train=300, n_val=30)
    other = make_all(tmp_path / "c", seed=6, n_train=300, n_val=30)
    for key, path in again.items():
        assert (tmp_path / "a" / f"{key}.jsonl").read_bytes() == path.read_bytes()
        assert other[key].read_bytes() != path.read_bytes()


def test_a_tiny_llama_learns_the_corpus(files: dict[str, Path]) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    train = [r["text"] for r in read(files["pretrain/train"])]
    held_out = [r["text"] for r in read(files["pretrain/validation"])][:64]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=1000, min_frequency=2, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    def batch(texts: list[str]) -> tuple[Any, Any]:
        ids = [e.ids[:48] for e in tokenizer.encode_batch(texts)]
        width = max(map(len, ids))
        x = torch.zeros(len(ids), width, dtype=torch.long)
        labels = torch.full_like(x, -100)
        for i, row in enumerate(ids):
            x[i, :len(row)] = labels[i, :len(row)] = torch.tensor(row)
        return x, labels

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))
    val_x, val_labels = batch(held_out)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(model(input_ids=val_x, attention_mask=(val_labels != -100).long(), labels=val_labels).loss)

    start = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rng = random.Random(0)
    for _ in range(30):
        x, labels = batch(rng.sample(train, 8))
        model(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    end = held_out_loss()
    assert end < 0.5 * start, (start, end)
