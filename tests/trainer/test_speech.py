"""The speech stages on kubetune's generated speech (espeak-ng): audioPretrain (wav2vec 2.0) learns its
masked contrastive task without its codebook collapsing; asr (CTC) fine-tunes that encoder with a
character vocabulary, its feature encoder left as it was; bad audio stops a stage before training.

The learning proofs at full length (held-out WER of CTC after pretraining, and from scratch) are
examples/speech-tiny.yaml's; these runs are a few dozen steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer_helpers import Trainer, report, weights

# espeak-ng is a system tool `make test` installs (Makefile SYSTEM_TOOLS): without it these tests fail, not skip

W2V = {"architecture": "wav2vec2", "hiddenSize": 32, "numLayers": 2, "numHeads": 2}
HP = {"batchSize": 8, "loggingSteps": 5, "saveSteps": 100000, "warmupRatio": 0.1, "lrSchedulerType": "cosine"}
# a 60-step run: let the Gumbel temperature fall from 2 to its floor of 0.5 in about 30 steps
PRETRAIN = {"numNegatives": 20, "gumbelTemperatureDecay": 0.95}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.data.synthetic_speech import make_speech

    paths = make_speech(tmp_path_factory.mktemp("speech"), seed=0, n_train=64, n_val=16, n_unlabelled=96)
    return {"speech/train": paths["speech/unlabelled"], "speech/validation": paths["speech/validation"],
            "asr/train": paths["speech/train"], "asr/validation": paths["speech/validation"]}


@pytest.fixture(scope="module")
def pretrained(speech: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    trainer = Trainer(speech, tmp_path_factory.mktemp("pretrain"))
    run = trainer.stage_run("pretrain", "audioPretrain", "audio", "speech", init=W2V,
                            hp={**HP, "maxSteps": 60, "learningRate": 2e-3}, audioPretrain=PRETRAIN)
    metrics = trainer.train(run)
    report("audioPretrain (wav2vec2, 60 steps)", metrics)
    return Path(run["outputUri"]), metrics


def test_audio_pretrain_learns_the_masked_task_without_collapse(pretrained: tuple[Path, dict[str, Any]]) -> None:
    out, metrics = pretrained
    before, after = metrics["before"], metrics["after"]
    assert metrics["primary"] == "evalLoss" and metrics["globalStep"] == 60
    assert after["evalLoss"] < before["evalLoss"] - 0.1  # the held-out contrastive loss per masked frame fell
    # 2 groups of 64 codevectors: a collapsed codebook uses about 1 per group
    assert after["codevectorPerplexity"] > 8
    assert metrics["sample"]["gumbelTemperature"] == pytest.approx(0.5)
    from transformers import AutoFeatureExtractor, Wav2Vec2ForPreTraining

    assert Wav2Vec2ForPreTraining.from_pretrained(str(out)).config.num_negatives == 20
    assert AutoFeatureExtractor.from_pretrained(str(out)).sampling_rate == 16000


def test_ctc_fine_tunes_the_pretrained_encoder_with_a_character_vocabulary(
    speech: dict[str, Path], pretrained: tuple[Path, dict[str, Any]], tmp_path: Path,
) -> None:
    encoder, _ = pretrained
    trainer = Trainer(speech, tmp_path)
    run = trainer.stage_run("ctc", "asr", "audioTranscript", "asr", model=encoder,
                            hp={**HP, "maxSteps": 40, "learningRate": 2e-3})
    metrics = trainer.train(run)
    report("asr CTC from the pretrained encoder (40 steps)", metrics)
    out = Path(run["outputUri"])
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    processor = Wav2Vec2Processor.from_pretrained(str(out))
    vocab = processor.tokenizer.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<unk>", "|")] == [0, 1, 2]  # the CTC blank is <pad>, id 0
    assert set(vocab) - {"<pad>", "<unk>", "|"} == set("".join(json.loads(line)["text"] for line in
                                                          speech["asr/train"].read_text().splitlines())) - {" "}
    model = Wav2Vec2ForCTC.from_pretrained(str(out))
    assert model.config.vocab_size == len(processor.tokenizer) == len(vocab) and model.config.pad_token_id == 0
    # the feature encoder stayed as pretrained; the transformer and the new head trained
    old, new = weights(encoder), weights(out)
    conv = [k for k in new if k.startswith("wav2vec2.feature_extractor.")]
    layers = [k for k in new if k.startswith("wav2vec2.encoder.layers.")]
    assert conv and all(torch.equal(old[k], new[k]) for k in conv)
    assert any(not torch.equal(old[k], new[k]) for k in layers)
    state = json.loads(max(out.glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses[-1] < 0.7 * losses[0]  # CTC's loss per clip fell
    assert metrics["primary"] == "wordErrorRate"
    assert set(metrics["before"]) == {"wordErrorRate", "characterErrorRate"}
    assert metrics["after"]["characterErrorRate"] <= metrics["before"]["characterErrorRate"]
    shown = metrics["sample"]["transcripts"]
    assert len(shown) == 4 and all(set(s) == {"text", "before", "after"} for s in shown)
    assert metrics["sample"]["frozenFeatureEncoder"] is True


def test_bad_audio_stops_the_stage_before_training(speech: dict[str, Path], tmp_path: Path) -> None:
    rows = [json.loads(line) for line in speech["asr/train"].read_text().splitlines()][:6]
    base = speech["asr/train"].parent
    rows = [{**r, "audio": str(base / r["audio"])} for r in rows]
    rows[3]["audio"] = str(tmp_path / "gone.flac")
    rows[4]["text"] = ""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer({"bad/train": data}, tmp_path)
    run = trainer.stage_run("ctc", "asr", "audioTranscript", "bad", init=W2V, hp={**HP, "maxSteps": 2})
    code, metrics = trainer.run(run)
    assert code == 1 and metrics is None
    error = (Path(run["outputUri"]) / "error.txt").read_text()
    assert "line 4: audio file" in error and "gone.flac does not exist" in error
    assert 'line 5: "text" is empty' in error
    assert not list(Path(run["outputUri"]).glob("checkpoint-*"))


def test_whisper_is_refused_naming_what_works(speech: dict[str, Path], tmp_path: Path) -> None:
    from transformers import WhisperConfig

    model = tmp_path / "whisper"
    WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(str(model))
    trainer = Trainer(speech, tmp_path)
    run = trainer.stage_run("whisper", "asr", "audioTranscript", "asr", model=model, hp={**HP, "maxSteps": 2})
    code, _ = trainer.run(run)
    assert code == 1
    assert "asr with Whisper is not implemented yet" in (Path(run["outputUri"]) / "error.txt").read_text()
