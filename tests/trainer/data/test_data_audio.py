"""audioTranscript and audio data: every file type loads the same clip, resampled to 16 kHz and
mixed down to mono; each bad clip or transcript is reported with its line and the file it names;
the report gives the hours and sample rates; the generated speech is valid and holds out unseen
voice/speed pairs."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from kubetune_trainer.data import DataError, load_report, load_rows, validate
from kubetune_trainer.data.audio import SAMPLE_RATE, load_audio
from kubetune_trainer.data.cli import validate_main
from trainer_helpers import jsonl

TONE = 440.0


def tone(seconds: float, rate: int, channels: int = 1, level: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (level * np.sin(2 * np.pi * TONE * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono, 0.5 * mono], axis=1)


def wav(path: Path, seconds: float = 0.5, rate: int = 22050, channels: int = 1, level: float = 0.5,
        fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, tone(seconds, rate, channels, level), rate, format=fmt)
    return path


def wav_bytes(seconds: float = 0.5, rate: int = 22050, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, tone(seconds, rate, channels), rate, format="WAV")
    return buf.getvalue()


def pitch(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """The strongest frequency of the clip, in Hz."""
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_every_file_type_gives_the_clip_at_16_khz_mono(tmp_path: Path) -> None:
    wav(tmp_path / "clips" / "a.wav", rate=44100, channels=2)
    wav(tmp_path / "clips" / "b.flac", rate=8000, fmt="FLAC")
    (tmp_path / "clips" / "rows.csv").write_text('audio,text\na.wav,three one\nb.flac,"four, five"\n')
    jsonl(tmp_path / "clips" / "rows.jsonl", [{"audio": "a.wav", "text": "three one"},
                                              {"audio": {"path": "b.flac"}, "text": "four, five"}])
    pq.write_table(pa.table({"audio": [wav_bytes(rate=44100, channels=2), wav_bytes(rate=8000)],
                             "text": ["three one", "four, five"]}), tmp_path / "binary.parquet")
    struct = [{"bytes": wav_bytes(rate=44100, channels=2), "path": None}, {"bytes": None, "path": "clips/b.flac"}]
    pq.write_table(pa.table({"audio": struct, "text": ["three one", "four, five"]}), tmp_path / "struct.parquet")
    arrays = [{"audio": {"array": tone(0.5, 44100).tolist(), "sampling_rate": 44100}, "text": "three one"},
              {"audio": {"array": tone(0.5, 8000).tolist(), "sampling_rate": 8000}, "text": "four, five"}]
    (tmp_path / "arrays.json").write_text(json.dumps(arrays))
    import datasets

    # as datasets stores an Audio column (cast, since encoding clips needs torchcodec)
    features = datasets.Features({"audio": datasets.Audio(), "text": datasets.Value("string")})
    struct[1]["path"] = str(tmp_path / "clips" / "b.flac")
    data = datasets.Dataset(pa.table({"audio": struct, "text": ["three one", "four, five"]})).cast(features)
    data.save_to_disk(str(tmp_path / "hf"))
    for uri in ("clips/rows.csv", "clips/rows.jsonl", "binary.parquet", "struct.parquet", "arrays.json", "hf"):
        rows = load_rows(str(tmp_path / uri), "audioTranscript")
        assert [r["text"] for r in rows] == ["three one", "four, five"], uri
        for row in rows:
            samples = load_audio(row["audio"])
            assert samples.ndim == 1 and samples.dtype == np.float32, uri
            assert abs(len(samples) - SAMPLE_RATE // 2) <= 2, uri  # half a second at 16 kHz
            assert abs(pitch(samples) - TONE) < 3, uri  # resampled, not re-pitched
    # the audio format reads the same rows without their transcripts
    assert [sorted(r) for r in load_rows(str(tmp_path / "clips/rows.jsonl"), "audio")] == [["audio"], ["audio"]]


def test_every_bad_clip_and_transcript_is_caught_on_its_line(tmp_path: Path) -> None:
    wav(tmp_path / "ok.wav")
    wav(tmp_path / "long.wav", seconds=31)
    wav(tmp_path / "short.wav", seconds=0.05)
    wav(tmp_path / "silent.wav", level=0.0)
    (tmp_path / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE not really")
    rows: list[Any] = [
        {"audio": "ok.wav", "text": "one two"},                              # 1 good
        {"audio": "gone.wav", "text": "one"},                                # 2 missing file
        {"audio": "noise.wav", "text": "one"},                               # 3 not decodable
        {"audio": "ok.wav", "text": "  "},                                   # 4 empty transcript
        {"audio": "long.wav", "text": "one"},                                # 5 longer than 30 s
        {"audio": "short.wav", "text": "one"},                               # 6 shorter than the minimum
        {"audio": "silent.wav", "text": "one"},                              # 7 silent
        {"audio": "ok.wav"},                                                 # 8 no transcript
        {"audio": {"array": [0.1, 0.2]}, "text": "one"},                     # 9 samples without their rate
        {"text": "one"},                                                     # 10 no audio
        {"audio": "ok.wav", "text": "three"},                                # 11 good
    ]
    report = validate(jsonl(tmp_path / "data.jsonl", rows), "audioTranscript")
    found: dict[int, list[str]] = {}
    for e in report.errors:
        found.setdefault(e.line, []).append(e.reason)
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert found[2] == ["audio file gone.wav does not exist; audio paths are relative to the data file's folder"]
    assert len(found[3]) == 1 and found[3][0].startswith("audio file noise.wav cannot be decoded (")
    assert found[4] == ['"text" is empty; write the text or drop the row']
    assert found[5] == ["audio file long.wav lasts 31.0 s, longer than the 30 s a model hears at once; cut it into "
                        "shorter clips or drop the row"]
    assert found[6] == ["audio file short.wav lasts 0.050 s, shorter than 0.1 s; drop the row or give the whole "
                        "utterance"]
    assert found[7] == ["audio file silent.wav is silent; drop the row or give the recording"]
    assert found[8] == ['missing "text"; add it, or map your column to it with columns: {text: yourColumn}']
    assert found[9][0].startswith("audio array of 2 samples cannot be decoded (a sample array needs its sampling_rate")
    assert found[10] == ['missing "audio"; add it, or map your column to it with columns: {audio: yourColumn}']
    assert (report.rows, report.valid_rows) == (11, 2)
    with pytest.raises(DataError, match="line 2: audio file gone.wav does not exist"):
        load_rows(str(tmp_path / "data.jsonl"), "audioTranscript")


def test_the_report_gives_hours_and_sample_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav(tmp_path / "a.wav", seconds=1.5, rate=22050)
    wav(tmp_path / "b.wav", seconds=0.5, rate=44100, channels=2)
    wav(tmp_path / "c.wav", seconds=2.0, rate=22050)
    uri = jsonl(tmp_path / "d.jsonl", [{"audio": "a.wav", "text": "one"}, {"audio": "b.wav", "text": "two"},
                                       {"audio": "c.wav", "text": "three"}, {"audio": "gone.wav", "text": "four"}])
    _, report = load_report(uri, "audioTranscript")
    assert report.stats["audio"] == {"clips": 3, "hours": 0.0011, "seconds": 4.0, "shortestSeconds": 0.5,
                                     "longestSeconds": 2.0, "sampleRates": {"22050": 2, "44100": 1}}
    assert validate_main([uri, "--format", "audioTranscript"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("invalid: 1 of 4 rows have problems")
    assert out[1] == ("audio: 0.0011 hours (4.0 s) in 3 clips of 0.50-2.00 s; sample rates 22050 Hz (2), "
                      "44100 Hz (1) (resampled to 16000 Hz for training)")
    assert out[2].startswith("line 4: audio file gone.wav does not exist")
    assert validate_main([uri, "--format", "audio", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["stats"]["audio"]["clips"] == 3


def test_generated_speech_is_valid_and_holds_out_unseen_voices(tmp_path: Path) -> None:
    from kubetune_trainer.data.synthetic_speech import DIGITS, WORDS, held_out_pairs, make_speech

    paths = make_speech(tmp_path, seed=1, n_train=16, n_val=6, n_unlabelled=8)
    train, held = (load_rows(str(paths[f"speech/{s}"]), "audioTranscript") for s in ("train", "validation"))
    assert (len(train), len(held)) == (16, 6)
    meta = {s: [json.loads(line) for line in paths[f"speech/{s}"].read_text().splitlines()]
            for s in ("train", "validation")}
    seen = {(r["voice"], r["speed"]) for r in meta["train"]}
    assert {(r["voice"], r["speed"]) for r in meta["validation"]} == held_out_pairs()
    assert not seen & held_out_pairs()
    for row in train + held:
        assert set(row["text"].split()) <= set(DIGITS + WORDS)
        assert 0.2 < len(load_audio(row["audio"])) / SAMPLE_RATE < 3.0
    report = validate(str(paths["speech/unlabelled"]), "audio")
    assert report.ok and report.stats["audio"]["clips"] == 8
    rates = validate(str(paths["speech/train"]), "audioTranscript").stats["audio"]["sampleRates"]
    assert set(rates) == {"22050", "44100"}  # some clips are stereo at 44.1 kHz: loaders resample and mix down
    again = make_speech(tmp_path / "again", seed=1, n_train=16, n_val=6, n_unlabelled=8)
    assert again["speech/train"].read_text() == paths["speech/train"].read_text()


def test_augmentation_perturbs_speed_noise_and_gain() -> None:
    from kubetune_trainer.data.audio import Augment

    clip = tone(1.0, SAMPLE_RATE)
    fast = Augment(speeds=(1.1,), snr_db=(200.0, 200.0), gain_db=(0.0, 0.0))(clip)
    assert abs(len(fast) - round(SAMPLE_RATE / 1.1)) <= 2  # 10% shorter...
    assert abs(pitch(fast) - TONE * 1.1) < 3  # ...and 10% higher, as a faster recording plays
    quiet = Augment(speeds=(1.0,), snr_db=(200.0, 200.0), gain_db=(-6.0, -6.0))(clip)
    assert len(quiet) == len(clip) and np.abs(quiet).max() == pytest.approx(0.5 * 10 ** (-6 / 20), rel=1e-3)
    noisy = Augment(speeds=(1.0,), snr_db=(10.0, 10.0), gain_db=(0.0, 0.0))(clip)
    snr = 10 * np.log10(np.mean(clip ** 2) / np.mean((noisy - clip) ** 2))
    assert 9.0 < snr < 11.0
