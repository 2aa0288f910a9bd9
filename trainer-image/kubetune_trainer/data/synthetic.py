"""python -m kubetune_trainer.data.synthetic --out DIR [--seed N]

A small task made by kubetune, for demos and for tests that must show a model learned.

Two parts, both generated (nothing is downloaded or shipped as files):

- a raw-text corpus about a made-up world (creatures with fixed colours, homes, food and
  leg counts; counting in number words, forwards and reversed; runs of the alphabet; phrases
  said twice), for pretraining from scratch. Its facts and patterns repeat, so a tiny model's
  validation loss falls far below where it starts;
- letter puzzles on short random strings, written with spaces between the letters so any
  byte-level tokenizer sees one token per letter, the task named last:

      q w e in capitals:      ->  " Q W E"
      q w e reversed:         ->  " e w q"
      q w e r first letter:   ->  " q"
      q w e r last letter:    ->  " r"

  Each answer follows a rule per token, so a model that learned the rule answers strings it
  never saw. Held-out strings appear in no training file (the corpus has only runs of the
  alphabet, which the puzzles never use), and `is_correct` scores a completion by exact match.
  Measured on 2 CPU cores with a llama of hidden size 64 and 2 layers, untied embeddings and
  a BPE tokenizer trained on the corpus (batch 32, lr 3e-3, cosine): pretraining 150 steps and
  then fine-tuning 300 steps on sft/train answers 0.85 of sft/validation exactly; fine-tuning
  a fresh model takes about 800 steps for 0.9.

Files written under DIR (format in brackets):

    pretrain/{train,validation}.jsonl        [text]
    sft/{train,validation}.jsonl             [promptCompletion]
    sft_cue/{train,validation}.jsonl         [promptCompletion] the first-letter task with a bare
                                             "=" for its name ("q w e =" -> " q"): for the methods
                                             that steer a fine-tuned model (prompt tuning, IA3, ...)
    sft_messages/{train,validation}.jsonl    [messages] with system turns, two-task
                                             conversations and tool calls
    preference/{train,validation}.jsonl      [preference] chosen correct, rejected a plausible wrong answer
    kto/{train,validation}.jsonl             [unpairedPreference] label true when correct
    digits/{train,validation}/<digit>/*.png  [imageLabel] ImageFolder, and the same rows as
    digits/{train,validation}.jsonl          JSONL (see synthetic_images.py)
    shapes/{train,validation}.jsonl          [imageCaption] captioned shapes ("a red circle on the
    shapes/{train,validation}/*.png          left", label "circle"; see synthetic_images.py)
    speech/{train,validation}.jsonl          [audioTranscript] espeak-ng speaking digit strings and
    speech/unlabelled.jsonl                  words ([audio]; see synthetic_speech.py; skipped when
                                             espeak-ng is not installed)
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LETTERS = string.ascii_lowercase

# task -> (rule, shortest and longest letter string). A prompt names the task last, next to
# where the answer starts: "q w e reversed:" -> " e w q".
TASKS: dict[str, tuple[Callable[[list[str]], list[str]], int, int]] = {
    "in capitals": (lambda s: [c.upper() for c in s], 3, 4),
    "reversed": (lambda s: s[::-1], 3, 4),
    "first letter": (lambda s: s[:1], 3, 5),
    "last letter": (lambda s: s[-1:], 3, 5),
}

CUE = "="  # the cue of sft_cue's rows, which name no task

SYSTEM_PROMPTS = (
    "You solve letter puzzles. Answer with the letters only.",
    "You are a careful assistant. Reply with the answer and nothing else.",
)

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink")
PLACES = ("forest", "river", "cave", "desert", "mountain", "marsh", "valley", "island", "meadow", "city")
FOODS = ("berries", "fish", "seeds", "moss", "honey", "bread", "roots", "apples", "beetles", "grass")
SYLLABLES = ("ka", "zo", "ri", "mu", "pe", "lo", "ta", "vi", "no", "sa", "du", "fe", "gi", "ba", "xo", "qu")


# --- the puzzles --------------------------------------------------------------------------


def prompt_for(task: str, letters: Sequence[str]) -> str:
    return f"{' '.join(letters)} {task}:"


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """(task, letters) of a puzzle prompt; ValueError if it is not one."""
    text = prompt.strip()
    for task in TASKS:
        if text.endswith(f" {task}:"):
            letters = text[: -len(task) - 2].split()
            if letters and all(len(c) == 1 and c in LETTERS for c in letters):
                return task, letters
    raise ValueError(f"not a synthetic puzzle prompt: {prompt!r}")


def answer(prompt: str) -> str:
    """The correct answer to a puzzle prompt, e.g. answer("a b c reversed:") == "c b a"."""
    task, letters = parse_prompt(prompt)
    return " ".join(TASKS[task][0](letters))


def is_correct(prompt: str, completion: str) -> bool:
    """Exact match of a completion with the answer, ignoring surrounding and repeated spaces."""
    return " ".join(completion.split()) == answer(prompt)


def wrong_answer(prompt: str, rng: random.Random) -> str:
    """A plausible wrong answer: the right shape, one rule broken."""
    task, letters = parse_prompt(prompt)
    right = TASKS[task][0](letters)
    if task == "in capitals":  # left lower case, one letter wrong, or reversed
        options = [list(letters), _change_one(right, rng)] + ([right[::-1]] if right != right[::-1] else [])
        out = rng.choice(options)
    elif task == "reversed":  # not reversed, or one letter wrong
        options = [_change_one(right, rng)] + ([list(letters)] if list(letters) != right else [])
        out = rng.choice(options)
    elif task == "first letter":  # another letter of the string
        others = [c for c in letters if c != letters[0]] or [_other_letter(letters[0], rng)]
        out = [rng.choice(others)]
    else:  # last letter
        others = [c for c in letters if c != letters[-1]] or [_other_letter(letters[-1], rng)]
        out = [rng.choice(others)]
    if out == right:
        out = _change_one(right, rng)
    return " ".join(out)


def _other_letter(c: str, rng: random.Random) -> str:
    return rng.choice([x for x in LETTERS if x != c.lower()])


def _change_one(letters: Sequence[str], rng: random.Random) -> list[str]:
    out = list(letters)
    i = rng.randrange(len(out))
    new = _other_letter(out[i], rng)
    out[i] = new.upper() if out[i].isupper() else new
    return out


def _draw_prompts(rng: random.Random, n: int, seen: set[str]) -> list[str]:
    """n prompts, the task drawn first, each on a letter string not in seen (which grows)."""
    names = list(TASKS)
    prompts: list[str] = []
    while len(prompts) < n:
        task = rng.choice(names)
        _, lo, hi = TASKS[task]
        s = [rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))]
        key = "".join(s)
        if key in seen or key in LETTERS:  # runs of the alphabet are in the corpus
            continue
        seen.add(key)
        prompts.append(prompt_for(task, s))
    return prompts


def puzzle_split(seed: int = 0, n_train: int = 2000, n_val: int = 200) -> tuple[list[str], list[str]]:
    """Train and held-out prompts; no letter string is in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train = _draw_prompts(rng, n_train, seen)
    return train, _draw_prompts(rng, n_val, seen)


# --- rows of each format ------------------------------------------------------------------


def sft_rows(prompts: Sequence[str]) -> list[dict[str, Any]]:
    return [{"prompt": p, "completion": " " + answer(p)} for p in prompts]


def cue_rows(prompts: Sequence[str]) -> list[dict[str, Any]]:
    """The first-letter task behind a new cue: "q w e =" -> " q". A model fine-tuned on the puzzles has
    the skill but not the cue: what prompt tuning and the other light methods can teach it."""
    return [{"prompt": " ".join(letters) + " " + CUE, "completion": " " + letters[0]}
            for letters in (parse_prompt(p)[1] for p in prompts)]


def preference_rows(prompts: Sequence[str], rng: random.Random) -> list[dict[str, Any]]:
    return [{"prompt": p, "chosen": " " + answer(p), "rejected": " " + wrong_answer(p, rng)} for p in prompts]


def kto_rows(prompts: Sequence[str], rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for p in prompts:
        good = rng.random() < 0.5
        rows.append({
            "prompt": p,
            "completion": " " + (answer(p) if good else wrong_answer(p, rng)),
            "label": good,
        })
    return rows


def _tool_turns(prompt: str, call_id: str) -> list[dict[str, Any]]:
    task, letters = parse_prompt(prompt)
    args = json.dumps({"task": task.lower(), "letters": "".join(letters)})
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "solve_puzzle", "arguments": args}},
        ]},
        {"role": "tool", "tool_call_id": call_id, "name": "solve_puzzle", "content": answer(prompt)},
        {"role": "assistant", "content": answer(prompt)},
    ]


def message_rows(prompts: Sequence[str], rng: random.Random) -> list[dict[str, Any]]:
    """Conversations: plain, with a system turn, two puzzles in one, or solved through a tool."""
    rows: list[dict[str, Any]] = []
    i = 0
    while i < len(prompts):
        kind = rng.random()
        turns: list[dict[str, Any]] = []
        if rng.random() < 0.3:
            turns.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if kind < 0.1:
            turns += _tool_turns(prompts[i], f"call_{i}")
            i += 1
        elif kind < 0.3 and i + 1 < len(prompts):
            for p in prompts[i:i + 2]:
                turns += [{"role": "user", "content": p}, {"role": "assistant", "content": answer(p)}]
            i += 2
        else:
            turns += [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": answer(prompts[i])}]
            i += 1
        rows.append({"messages": turns})
    return rows


def pretrain_rows(rng: random.Random, world: dict[str, dict[str, str]], n: int) -> list[dict[str, Any]]:
    """Paragraphs of 3 to 6 sentences about the world, counting and letter runs."""
    names = sorted(world)

    def sentence() -> str:
        kind = rng.random()
        if kind < 0.45:
            name = rng.choice(names)
            facts = world[name]
            return rng.choice((
                f"The {name} is {facts['colour']}.",
                f"A {name} lives in the {facts['place']}.",
                f"Every {name} eats {facts['food']}.",
                f"A {name} has {facts['legs']} legs.",
                f"The {facts['colour']} {name} sleeps in the {facts['place']}.",
            ))
        if kind < 0.6:
            start = rng.randrange(0, len(NUMBER_WORDS) - 6)
            run = NUMBER_WORDS[start:start + rng.randint(3, 6)]
            if rng.random() < 0.5:
                return f"Count from {run[0]}: {' '.join(run)}."
            return f"{' '.join(run)} reversed: {' '.join(run[::-1])}."
        if kind < 0.8:
            # runs of the alphabet only: the puzzles' random strings never are one
            start = rng.randrange(0, len(LETTERS) - 6)
            run = list(LETTERS[start:start + rng.randint(3, 6)])
            return rng.choice((
                f"Letters: {' '.join(run)}.",
                f"{' '.join(run)} in capitals: {' '.join(run).upper()}.",
                f"{' '.join(run)} first letter: {run[0]}.",
                f"{' '.join(run)} last letter: {run[-1]}.",
            ))
        if kind < 0.9:
            words = rng.sample(names, rng.randint(2, 4))
            return f"Say it twice: {' '.join(words)}, {' '.join(words)}."
        a, b = rng.randrange(0, 10), rng.randrange(0, 10)
        return f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."

    return [{"text": " ".join(sentence() for _ in range(rng.randint(3, 6)))} for _ in range(n)]


def make_world(rng: random.Random, n: int = 24) -> dict[str, dict[str, str]]:
    world: dict[str, dict[str, str]] = {}
    while len(world) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        world.setdefault(name, {
            "colour": rng.choice(COLOURS),
            "place": rng.choice(PLACES),
            "food": rng.choice(FOODS),
            "legs": NUMBER_WORDS[rng.choice((2, 4, 6, 8))],
        })
    return world


def make_all(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_val: int = 200) -> dict[str, Path]:
    """Write every file; returns {"sft/train": path, ...} (keys are the paths without .jsonl)."""
    out = Path(out_dir)
    rng = random.Random(seed)
    train, val = puzzle_split(seed, n_train, n_val)
    world = make_world(rng)
    files: dict[str, list[dict[str, Any]]] = {
        "pretrain/train": pretrain_rows(rng, world, n_train),
        "pretrain/validation": pretrain_rows(rng, world, n_val),
        "sft/train": sft_rows(train),
        "sft/validation": sft_rows(val),
        "sft_cue/train": cue_rows(train),
        "sft_cue/validation": cue_rows(val),
        "sft_messages/train": message_rows(train, rng),
        "sft_messages/validation": message_rows(val, rng),
        "preference/train": preference_rows(train, rng),
        "preference/validation": preference_rows(val, rng),
        "kto/train": kto_rows(train, rng),
        "kto/validation": kto_rows(val, rng),
    }
    paths = {}
    for key, rows in files.items():
        path = out / f"{key}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[key] = path
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.data.synthetic",
        description="Write kubetune's synthetic pretraining corpus and letter-puzzle data sets as JSONL, and the "
                    "digit and captioned shape images.",
    )
    parser.add_argument("--out", required=True, help="Folder to write into (created if missing).")
    parser.add_argument("--seed", type=int, default=0, help="Seed; the same seed writes the same files.")
    parser.add_argument("--train", type=int, default=2000, help="Training rows per file.")
    parser.add_argument("--validation", type=int, default=200, help="Held-out rows per file.")
    parser.add_argument("--image-size", type=int, default=32, help="Side in pixels of the digit and shape images.")
    args = parser.parse_args(argv)
    from kubetune_trainer.data.synthetic_images import make_digits, make_shapes

    paths = make_all(args.out, seed=args.seed, n_train=args.train, n_val=args.validation)
    paths.update(make_digits(args.out, seed=args.seed, size=args.image_size))
    paths.update(make_shapes(args.out, seed=args.seed, size=args.image_size))
    from kubetune_trainer.data import synthetic_speech

    try:
        paths.update(synthetic_speech.make_speech(args.out, seed=args.seed))
    except RuntimeError as e:  # no espeak-ng: the text and image sets are still useful
        print(f"Skipped speech: {e}", file=sys.stderr)
    for key, path in paths.items():
        print(f"Wrote {key} path={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
