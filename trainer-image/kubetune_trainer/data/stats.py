"""Held-out splits and token statistics of loaded rows."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any, TypeVar

from kubetune.api.formats import held_out_count

from kubetune_trainer.data.formats import get_format

T = TypeVar("T")


def split_rows(rows: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held_out): `held_out_count(len(rows), fraction)` rows held out (the operator counts
    a PreferenceDataset's split with the same rule), chosen by seed; both keep the rows' order."""
    n = len(rows)
    k = held_out_count(n, fraction)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _as_text(value: Any) -> str:
    """A field as the text its tokens are counted on: message lists become their contents and
    tool calls, one turn a line (a chat template adds a few tokens per turn on top)."""
    if isinstance(value, str):
        return value
    parts = []
    for turn in value:
        parts.append(turn.get("content") or "")
        if turn.get("tool_calls"):
            parts.append(json.dumps(turn["tool_calls"]))
    return "\n".join(parts)


def _lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    out: list[int] = []
    for i in range(0, len(texts), 1024):
        chunk = texts[i:i + 1024]
        if hasattr(tokenizer, "encode_batch"):  # a `tokenizers.Tokenizer`
            out += [len(e.ids) for e in tokenizer.encode_batch(chunk, add_special_tokens=False)]
        else:  # a transformers tokenizer
            out += [len(ids) for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]]
    return out


def token_stats(rows: Sequence[dict[str, Any]], fmt: str, tokenizer: Any) -> dict[str, float]:
    """Mean and max length in tokens of each text field: {"promptMean": .., "promptMax": .., ...}."""
    stats: dict[str, float] = {}
    for field in get_format(fmt).text_fields:
        texts = [_as_text(r[field]) for r in rows if r.get(field) is not None]
        if not texts:
            continue
        lengths = _lengths(tokenizer, texts)
        stats[f"{field}Mean"] = round(sum(lengths) / len(lengths), 2)
        stats[f"{field}Max"] = float(max(lengths))
    return stats
