"""The dataset formats' field tables and the held-out split rule, shared by the operator and the trainer.

`kubetune validate` checks `dataset.columns` against these fields, the operator counts a
PreferenceDataset's split with `held_out_count`, and the trainer's loaders
(`kubetune_trainer.data.formats`, `.stats`) read the same tables, so the two sides cannot
disagree about which columns a format has or how many rows are held out.
"""

from __future__ import annotations

from typing import Literal

DatasetFormat = Literal[
    "text",
    "promptCompletion",
    "messages",
    "preference",
    "unpairedPreference",
    "imageLabel",
    "imageCaption",
    "audioTranscript",
    "audio",
]

# format -> (required fields, optional fields)
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("text",), ()),
    "promptCompletion": (("prompt", "completion"), ()),
    "messages": (("messages",), ("tools",)),
    "preference": (("prompt", "chosen", "rejected"), ()),
    "unpairedPreference": (("prompt", "completion", "label"), ()),
    "imageLabel": (("image", "label"), ()),
    "imageCaption": (("image", "caption"), ("label",)),  # label: the class, for zero-shot accuracy
    "audioTranscript": (("audio", "text"), ()),
    "audio": (("audio",), ()),
}


def fields(fmt: str) -> tuple[str, ...]:
    """Every field a row of `fmt` may have: the required ones, then the optional ones."""
    required, optional = FORMAT_FIELDS[fmt]
    return required + optional


def held_out_count(rows: int, fraction: float) -> int:
    """Rows held out of `rows` for evaluation: round(rows * fraction), at least 1 and at most
    rows - 1 when fraction > 0 and there are two rows or more."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be at least 0 and below 1, got {fraction}")
    k = round(rows * fraction)
    if fraction > 0 and rows >= 2:
        k = min(max(k, 1), rows - 1)
    return k
