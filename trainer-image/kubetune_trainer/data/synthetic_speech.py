"""python -m kubetune_trainer.data.synthetic_speech --out DIR   (also run by `python -m kubetune_trainer.data.synthetic`)

Speech made by kubetune for demos and for tests that must show a speech model learned; nothing is
downloaded. espeak-ng (a Debian package the set-up installs) speaks

    digit strings       2 to 4 digits as words: "three one four"
    short words         one of yes, no, up, down, left, right, stop, go, on, off (a fifth of the clips)

in VOICES (espeak-ng voices with a variant: accent and timbre) at SPEEDS (words per minute) and a
random pitch, then white noise at 15-35 dB SNR and a random gain are added. Held-out utterances
use voice/speed combinations that no training clip uses (each voice and each speed is heard in
training, never together): the model must generalise across speakers, not recognise them.

Clips are FLAC at espeak-ng's 22050 Hz, mono; one in STEREO_EVERY training and unlabelled clips is
written as stereo at 44.1 kHz (as a second microphone would record it), so loaders must resample
and mix down. Written under DIR as

    speech/train/<index>.flac, speech/train.jsonl               [audioTranscript] {"audio":
                                                                 "train/00042.flac", "text": "three
                                                                 one four", "voice": ..., "speed": ...}
    speech/validation/<index>.flac, speech/validation.jsonl     [audioTranscript] unseen voice/speed
    speech/unlabelled/<index>.flac, speech/unlabelled.jsonl     [audio] {"audio": ...}: more clips
                                                                 without transcripts, for audioPretrain

The same seed writes the same files (given the same espeak-ng).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go", "on", "off")
WORD_SHARE = 0.2  # share of clips that are one short word rather than a digit string
# espeak-ng voice + variant (accent and timbre); the pitch is drawn per clip
VOICES = ("en-us+m1", "en-us+f2", "en-gb+m3", "en-gb+f4", "en-gb-scotland+m2", "en-029+f1")
SPEEDS = (130, 155, 180)  # words per minute
PITCHES = (30, 70)  # espeak-ng's pitch, 0-99: drawn in this range
SNR_DB = (15.0, 35.0)
GAIN_DB = (-12.0, 0.0)
RATE = 22050  # espeak-ng's own sample rate
STEREO_RATE = 44100
STEREO_EVERY = 8


def espeak() -> str:
    """The espeak-ng command; RuntimeError naming the package when it is not installed."""
    found = shutil.which("espeak-ng")
    if found is None:
        raise RuntimeError("espeak-ng is not installed; `apt-get install espeak-ng` (make setup installs it)")
    return found


def held_out_pairs() -> set[tuple[str, int]]:
    """The voice/speed combinations only held-out clips use: for voice i, speed i mod len(SPEEDS)."""
    return {(v, SPEEDS[i % len(SPEEDS)]) for i, v in enumerate(VOICES)}


def training_pairs() -> list[tuple[str, int]]:
    held = held_out_pairs()
    return [(v, s) for v in VOICES for s in SPEEDS if (v, s) not in held]


def utterance(rng: random.Random) -> str:
    """ "three one four" (2-4 digits), or one short word."""
    if rng.random() < WORD_SHARE:
        return rng.choice(WORDS)
    return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 4)))


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's clip of `text` as float32 samples at RATE, leading and trailing silence trimmed."""
    import soundfile

    wav = subprocess.run([espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    if rate != RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz audio; kubetune expects {RATE} Hz")
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    if len(loud):
        pad = RATE // 20  # keep 50 ms either side
        samples = samples[max(0, loud[0] - pad):loud[-1] + pad]
    return np.asarray(samples, dtype=np.float32)


def degrade(samples: np.ndarray, rng: random.Random) -> np.ndarray:
    """White noise at a random SNR, then a random gain (clipped to full scale)."""
    gen = np.random.default_rng(rng.getrandbits(32))
    power = float(np.mean(samples ** 2)) or 1e-8
    snr = rng.uniform(*SNR_DB)
    noisy = samples + gen.normal(0.0, np.sqrt(power / 10 ** (snr / 10)), len(samples)).astype(np.float32)
    gain = 10 ** (rng.uniform(*GAIN_DB) / 20)
    return np.clip(noisy * gain, -1.0, 1.0).astype(np.float32)


def write_clip(path: Path, samples: np.ndarray, stereo: bool) -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    if stereo:
        import torch
        import torchaudio.functional as F

        up = F.resample(torch.from_numpy(samples), RATE, STEREO_RATE).numpy()
        soundfile.write(path, np.stack([up, 0.8 * up], axis=1), STEREO_RATE, format="FLAC")
    else:
        soundfile.write(path, samples, RATE, format="FLAC")


def make_split(root: Path, name: str, n: int, pairs: Sequence[tuple[str, int]], rng: random.Random,
               transcripts: bool = True) -> Path:
    """Write n clips under root/name and their rows to root/name.jsonl; returns the JSONL path."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        text = utterance(rng)
        voice, speed = pairs[i % len(pairs)] if name == "validation" else rng.choice(list(pairs))
        samples = degrade(speak(text, voice, speed, rng.randint(*PITCHES)), rng)
        rel = f"{name}/{i:05d}.flac"
        write_clip(root / rel, samples, stereo=name != "validation" and i % STEREO_EVERY == STEREO_EVERY - 1)
        rows.append({"audio": rel, "text": text, "voice": voice, "speed": speed} if transcripts else {"audio": rel})
    index = root / f"{name}.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return index


def make_speech(out_dir: str | Path, seed: int = 0, n_train: int = 400, n_val: int = 96,
                n_unlabelled: int = 1200) -> dict[str, Path]:
    """Write the spoken digits and words (see the module docstring); returns {"speech/train": jsonl,
    "speech/validation": jsonl, "speech/unlabelled": jsonl}."""
    espeak()
    root = Path(out_dir) / "speech"
    rng = random.Random(f"speech-{seed}")
    train = training_pairs()
    return {
        "speech/train": make_split(root, "train", n_train, train, rng),
        "speech/validation": make_split(root, "validation", n_val, sorted(held_out_pairs()), rng),
        "speech/unlabelled": make_split(root, "unlabelled", n_unlabelled, train, rng, transcripts=False),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.data.synthetic_speech",
        description="Write kubetune's synthetic speech (espeak-ng digit strings and words) as FLAC clips and JSONL.",
    )
    parser.add_argument("--out", required=True, help="Folder to write into (created if missing).")
    parser.add_argument("--seed", type=int, default=0, help="Seed; the same seed writes the same files.")
    parser.add_argument("--train", type=int, default=400, help="Transcribed training clips.")
    parser.add_argument("--validation", type=int, default=96, help="Held-out clips (unseen voice/speed pairs).")
    parser.add_argument("--unlabelled", type=int, default=1200, help="Clips without transcripts (audioPretrain).")
    args = parser.parse_args(argv)
    paths = make_speech(args.out, args.seed, args.train, args.validation, args.unlabelled)
    for key, path in paths.items():
        print(f"Wrote {key} path={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
