"""Audio rows: decoding every clip, resampling it to 16 kHz, and what a speech set must hold.

    kubetune validate-data examples/data/speech/train.jsonl --format audioTranscript

Where the audio of an `audioTranscript` ({audio, text}) or `audio` ({audio}) row comes from:

    a path          {"audio": "clips/1.wav"}, relative to the folder of the data file (JSONL, JSON,
                    CSV, Parquet) or absolute; any format soundfile reads (WAV, FLAC, OGG, MP3)
    bytes           {"audio": {"bytes": b"...", "path": ...}} as the `datasets` Audio feature stores
                    them (Parquet, datasets folders), or a binary column
    samples         {"audio": {"array": [floats], "sampling_rate": 22050}} (JSON)

Each clip is decoded once while validating (soundfile), so a file that is missing or cannot be
decoded is found, with its line and its name, before training starts; so is a clip longer than a
model hears at once (MAX_SECONDS, Whisper's 30-second window), shorter than MIN_SECONDS, or
silent. The report says how many hours the set holds and which sample rates it was recorded at.

Recipes read clips with `load_audio`: any sample rate is resampled to SAMPLE_RATE with
torchaudio (`torchaudio.transforms.Resample`), and stereo is mixed down to mono.
"""

from __future__ import annotations

import functools
import io
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubetune_trainer.data import images
from kubetune_trainer.data.images import base_folder
from kubetune_trainer.data.readers import Record, Source

AUDIO_FORMATS = ("audioTranscript", "audio")
SAMPLE_RATE = 16000  # what wav2vec 2.0 and Whisper hear
MAX_SECONDS = 30.0  # Whisper's window; wav2vec 2.0 has none, but longer clips rarely fit in memory
MIN_SECONDS = 0.1  # below this a clip holds less than a syllable (and under wav2vec 2.0's 400-sample receptive field)
SILENCE = 1e-4  # a clip whose loudest sample is below this (of full scale) is taken as silent


def resolve(value: Any, base: Path) -> Any:
    """The audio value with its path made absolute, as images.resolve does; a decoded sample array
    (a `datasets` Audio feature's) is kept as it is."""
    if isinstance(value, dict) and value.get("bytes") is None and value.get("array") is not None:
        return {"array": value["array"], "sampling_rate": value.get("sampling_rate")}
    return images.resolve(value, base)


def _shown(value: Any, base: Path) -> str:
    if isinstance(value, str):
        try:
            return f"audio file {Path(value).relative_to(base).as_posix()}"
        except ValueError:
            return f"audio file {value}"
    if isinstance(value, dict) and "array" in value:
        return f"audio array of {len(value['array'])} samples"
    data: Any = value.get("bytes") if isinstance(value, dict) else value
    return f"audio of {len(data)} bytes"


def decode(value: Any) -> tuple[np.ndarray, int]:
    """A resolved audio value (see `resolve`) as (mono float32 samples, sample rate): stereo and
    other multi-channel clips are mixed down to their mean. Raises what soundfile raises, and
    ValueError for a sample array without its rate."""
    if isinstance(value, dict) and "array" in value:
        rate = value.get("sampling_rate")
        if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
            raise ValueError("a sample array needs its sampling_rate (a positive integer, in Hz)")
        samples = np.asarray(value["array"], dtype=np.float32)
        if samples.ndim == 2:  # (frames, channels), as soundfile reads them
            samples = samples.mean(axis=1)
        return samples, rate
    import soundfile

    data: Any = value.get("bytes") if isinstance(value, dict) else value
    source: Any = value if isinstance(value, str) else io.BytesIO(data)
    samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    return samples.mean(axis=1), int(rate)


@functools.lru_cache(maxsize=16)
def _resampler(rate: int, target: int) -> Any:
    import torchaudio

    return torchaudio.transforms.Resample(rate, target)  # its sinc kernel is computed once per pair of rates


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """The samples at `target` Hz (torchaudio's windowed-sinc resampling, as torchaudio.functional.resample);
    unchanged when already there."""
    if rate == target:
        return samples
    import torch

    with torch.no_grad():
        out: np.ndarray = _resampler(rate, target)(torch.from_numpy(np.ascontiguousarray(samples))).numpy()
    return out


def load_audio(value: Any, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A resolved audio value as mono float32 samples at `rate` Hz."""
    samples, own = decode(value)
    return resample(samples, own, rate)


def clip_problem(value: Any, base: Path, min_seconds: float = MIN_SECONDS, max_seconds: float = MAX_SECONDS,
                 ) -> tuple[str | None, float, int]:
    """(what is wrong with the clip, naming it, or None; its length in seconds; its sample rate)."""
    shown = _shown(value, base)
    if isinstance(value, str) and not Path(value).is_file():
        return f"{shown} does not exist; audio paths are relative to the data file's folder", 0.0, 0
    try:
        samples, rate = decode(value)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError for a bad file
        reason = str(e).strip() or type(e).__name__
        return f"{shown} cannot be decoded ({reason}); convert it to WAV or FLAC, or drop the row", 0.0, 0
    seconds = len(samples) / rate
    if seconds > max_seconds:
        return (f"{shown} lasts {seconds:.1f} s, longer than the {max_seconds:g} s a model hears at once; "
                "cut it into shorter clips or drop the row"), seconds, rate
    if seconds < min_seconds:
        return (f"{shown} lasts {seconds:.3f} s, shorter than {min_seconds:g} s; "
                "drop the row or give the whole utterance"), seconds, rate
    if not np.isfinite(samples).all():
        return f"{shown} holds samples that are not numbers (NaN or infinite); re-export it", seconds, rate
    if float(np.abs(samples).max()) < SILENCE:
        return f"{shown} is silent; drop the row or give the recording", seconds, rate
    return None, seconds, rate


def stats(seconds: Sequence[float], rates: Sequence[int]) -> dict[str, Any]:
    """What a report says of the valid clips: their count, hours, shortest and longest, sample rates."""
    total = float(sum(seconds))
    return {
        "clips": len(seconds),
        "hours": round(total / 3600, 4),
        "seconds": round(total, 2),
        "shortestSeconds": round(min(seconds), 3) if seconds else 0.0,
        "longestSeconds": round(max(seconds), 3) if seconds else 0.0,
        "sampleRates": {str(r): n for r, n in sorted(Counter(rates).items())},
    }


def describe(s: dict[str, Any]) -> str:
    """ "audio: 0.0123 hours (44.3 s) in 30 clips of 0.9-2.1 s; sample rates 22050 Hz (28), 44100 Hz (2)"."""
    rates = ", ".join(f"{r} Hz ({n})" for r, n in s["sampleRates"].items()) or "none"
    return (f"audio: {s['hours']:.4f} hours ({s['seconds']:.1f} s) in {s['clips']} clips of "
            f"{s['shortestSeconds']:.2f}-{s['longestSeconds']:.2f} s; sample rates {rates} "
            f"(resampled to {SAMPLE_RATE} Hz for training)")


def check_rows(
    source: Source, rows: Sequence[tuple[Record, dict[str, Any]]],
) -> tuple[list[tuple[dict[str, Any], list[str]]], dict[str, Any]]:
    """Each row (canonical, with no problem of its own) with its audio resolved and decoded and the
    problems found, and the `stats` of the clips that decoded."""
    checked: list[tuple[dict[str, Any], list[str]]] = []
    seconds: list[float] = []
    rates: list[int] = []
    for record, row in rows:
        base = base_folder(source, record.file)
        audio = resolve(row["audio"], base)
        problem, length, rate = clip_problem(audio, base)
        checked.append(({**row, "audio": audio}, [problem] if problem else []))
        if problem is None:
            seconds.append(length)
            rates.append(rate)
    return checked, stats(seconds, rates)


class AudioRows:
    """A map-style dataset of rows with their clip decoded at SAMPLE_RATE: {"audio": float32 samples
    (augmented when `augment` is given), **fields(row)}, e.g. fields=lambda r: {"text": r["text"]}."""

    def __init__(self, rows: Sequence[dict[str, Any]], fields: Callable[[dict[str, Any]], dict[str, Any]],
                 augment: Callable[[np.ndarray], np.ndarray] | None = None, rate: int = SAMPLE_RATE) -> None:
        self.rows, self.fields, self.augment, self.rate = rows, fields, augment, rate

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        samples = load_audio(row["audio"], self.rate)
        if self.augment is not None:
            samples = self.augment(samples)
        return {"audio": samples, **self.fields(row)}


class Augment:
    """Training-clip augmentation with torchaudio, each step drawn per clip: speed perturbation (Ko et
    al. 2015: the clip resampled so it plays `speeds` times as fast, pitch and tempo together), white
    noise at an SNR drawn from `snr_db` (torchaudio.functional.add_noise), and a gain drawn from
    `gain_db` (torchaudio.functional.gain), clipped to full scale. Held-out clips are never augmented."""

    def __init__(self, speeds: Sequence[float] = (0.9, 1.0, 1.1), snr_db: tuple[float, float] = (10.0, 40.0),
                 gain_db: tuple[float, float] = (-6.0, 6.0), seed: int = 0) -> None:
        self.speeds, self.snr_db, self.gain_db = tuple(speeds), snr_db, gain_db
        self.rng = np.random.default_rng(seed)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        import torch
        import torchaudio.functional as F

        speed = float(self.rng.choice(self.speeds))
        if speed != 1.0:  # played `speed` times as fast: fewer samples at the same rate
            samples = resample(samples, round(SAMPLE_RATE * speed), SAMPLE_RATE)
        with torch.no_grad():
            wave = torch.from_numpy(np.ascontiguousarray(samples)).unsqueeze(0)
            noise = torch.from_numpy(self.rng.standard_normal(wave.shape[-1]).astype(np.float32)).unsqueeze(0)
            snr = torch.tensor([self.rng.uniform(*self.snr_db)], dtype=torch.float32)
            wave = F.add_noise(wave, noise, snr)
            wave = F.gain(wave, float(self.rng.uniform(*self.gain_db))).clamp(-1.0, 1.0)
        out: np.ndarray = wave.squeeze(0).numpy()
        return out
