"""kubetune serve on asr stages' folders (Whisper, and wav2vec 2.0 CTC): held-out clips sent as encoded audio
files (FLAC, and WAV at another sample rate) get the transcripts the trainer's own held-out evaluation wrote
(metrics.json's sample), over v1 and v2; bad audio gets a 400 while the server keeps serving. The Whisper is
tests/conftest.py's session one (WER about 0.11, tests/trainer/test_speech.py), trained with one torch thread as
the server runs: it hears what the trainer's evaluation heard, word for word. The CTC model is trained here for a
few dozen steps and still writes nothing: for it the test shows that kubetune-serve loads and runs a CTC folder
(the empty transcripts match too), not what it transcribes."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from serving_helpers import Server  # noqa: E402
from trainer_helpers import SPEECH_HP, Trainer  # noqa: E402

pytestmark = pytest.mark.slow  # a minute or two of training before each server starts

W2V = {"architecture": "wav2vec2", "hiddenSize": 32, "numLayers": 2, "numHeads": 2}


@pytest.fixture(scope="module", params=["whisper", "ctc"])
def served(request: pytest.FixtureRequest, spoken: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, str, dict[str, Any]]]:
    """(a client of the server, the served name, the stage's metrics.json)."""
    name = request.param
    if name == "whisper":
        out, metrics = request.getfixturevalue("whisper")
    else:
        trainer = Trainer(spoken, tmp_path_factory.mktemp("runs"))
        run = trainer.stage_run(name, "asr", "audioTranscript", "asr", init=W2V,
                                hp={**SPEECH_HP, "maxSteps": 40, "learningRate": 2e-3})
        out, metrics = Path(run["outputUri"]), trainer.train(run)
    started = Server(str(out), log=tmp_path_factory.mktemp("logs") / "serve.log")
    try:
        started.wait_ready()
        yield started.http, name, metrics
    finally:
        started.stop()


def held_out(spoken: dict[str, Path], n: int) -> list[bytes]:
    """The first n held-out clips as their FLAC files' bytes (the order the trainer's sample shows them in)."""
    index = spoken["asr/validation"]
    rows = [json.loads(line) for line in index.read_text().splitlines()][:n]
    return [(index.parent / r["audio"]).read_bytes() for r in rows]


def as_wav(flac: bytes, rate: int) -> bytes:
    """The clip re-encoded as 16-bit WAV at another sample rate: the server must resample it."""
    import soundfile
    import torch
    import torchaudio

    samples, original = soundfile.read(io.BytesIO(flac), dtype="float32")
    resampled = torchaudio.functional.resample(torch.from_numpy(samples), original, rate).numpy()
    out = io.BytesIO()
    soundfile.write(out, resampled, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def test_held_out_clips_get_the_trainers_transcripts(served: tuple[httpx.Client, str, dict[str, Any]],
                                                      spoken: dict[str, Path]) -> None:
    http, name, metrics = served
    expected = [s["after"] for s in metrics["sample"]["transcripts"]]
    clips = [base64.b64encode(c).decode() for c in held_out(spoken, len(expected))]
    r = http.post(f"/v1/models/{name}:predict", json={"instances": [{"audio": {"b64": c}} for c in clips]})
    assert r.status_code == 200, r.text
    said = [" ".join(p["text"].lower().split()) for p in r.json()["predictions"]]
    print(f"\n{name} served: {said}\ntrainer's: {expected}")
    assert said == expected

    v2 = http.post(f"/v2/models/{name}/infer", json={"inputs": [
        {"name": "audio", "shape": [len(clips)], "datatype": "BYTES", "data": clips}]})
    assert v2.status_code == 200, v2.text
    (output,) = v2.json()["outputs"]
    assert output["name"] == "text" and [" ".join(t.lower().split()) for t in output["data"]] == expected


def test_a_wav_at_another_sample_rate_is_resampled(served: tuple[httpx.Client, str, dict[str, Any]],
                                                   spoken: dict[str, Path]) -> None:
    http, name, metrics = served
    (flac,) = held_out(spoken, 1)
    r = http.post(f"/v1/models/{name}:predict", json={"instances": [base64.b64encode(as_wav(flac, 44100)).decode()]})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["predictions"][0]["text"], str)
    if name == "whisper":
        assert " ".join(r.json()["predictions"][0]["text"].lower().split()) == metrics["sample"]["transcripts"][0]["after"]


def test_bad_audio_gets_a_400_and_the_server_keeps_serving(served: tuple[httpx.Client, str, dict[str, Any]],
                                                           spoken: dict[str, Path]) -> None:
    http, name, _ = served
    bad = [({"instances": ["not base64!"]}, "not valid base64"),
           ({"instances": [base64.b64encode(b"no audio file").decode()]}, "cannot be decoded"),
           ({"instances": [{"text": "hello"}]}, "an audio instance")]
    for body, message in bad:
        r = http.post(f"/v1/models/{name}:predict", json=body)
        assert r.status_code == 400, r.text
        assert message in r.text
    (flac,) = held_out(spoken, 1)
    r = http.post(f"/v1/models/{name}:predict", json={"instances": [base64.b64encode(flac).decode()]})
    assert r.status_code == 200, r.text
