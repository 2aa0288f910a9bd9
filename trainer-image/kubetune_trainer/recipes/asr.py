"""kubetune-train STAGERUN.json   (a stage of type asr)

Speech recognition with transformers' Trainer on `audioTranscript` rows {audio, text} (JSONL, CSV,
Parquet, a datasets folder; see data/audio.py). The model's architecture decides how:

    wav2vec 2.0 + CTC   Wav2Vec2ForCTC from model.uri (the output of an audioPretrain stage or a
                        wav2vec 2.0 checkpoint: a new CTC head) or built from model.init (architecture
                        wav2vec2). Its processor pairs the model's feature extractor with a character
                        vocabulary built from the transcripts (Wav2Vec2CTCTokenizer: "|" between words,
                        <pad> the CTC blank), saved beside the model; a model.uri that already has a
                        tokenizer keeps it. The convolutional feature encoder stays frozen when the
                        model was pretrained (asr.freezeFeatureEncoder), as in the wav2vec 2.0 paper;
                        the transformer sees SpecAugment-style time masks (asr.maskTimeProb).
    Whisper             not implemented yet (refused, naming what to use instead).

    tuning      full
    augment     training clips only (asr.augment): speed perturbation 0.9/1.0/1.1, white noise at
                10-40 dB SNR, gain of -6..6 dB, all with torchaudio (data/audio.Augment)

Transcripts are lower-cased with runs of spaces collapsed (`normalise`), for training and scoring.
Held-out figures, before and after, by greedy decoding: wordErrorRate (the primary one) and
characterErrorRate (jiwer); metrics.json shows a few held-out transcripts beside the reference.
`Wav2Vec2ForCTC.from_pretrained` and `Wav2Vec2Processor.from_pretrained` load the stage folder.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from kubetune.api import StageRun
from kubetune.api.registry import AsrSpec
from transformers import AutoConfig, AutoFeatureExtractor, Trainer, TrainingArguments, Wav2Vec2CTCTokenizer, Wav2Vec2Processor

from kubetune_trainer import common, models, storage
from kubetune_trainer.common import Context
from kubetune_trainer.data import audio

log = logging.getLogger("kubetune_trainer")

EVAL_LIMIT = 500  # held-out clips transcribed before and after
EVAL_BATCH = 16
SHOWN = 4  # held-out transcripts shown in metrics.json
PAD, UNK, WORD = "<pad>", "<unk>", "|"
METHODS = ("full",)
CTC_MODEL_TYPES = ("wav2vec2", "wav2vec2-conformer", "hubert", "wavlm", "data2vec-audio", "unispeech-sat")


def normalise(text: str) -> str:
    """ "  Three One  " -> "three one": what the model learns to write and is scored against."""
    return " ".join(text.lower().split())


# --- data ---------------------------------------------------------------------------------


def character_vocabulary(texts: list[str]) -> dict[str, int]:
    """{token: id} of a CTC head: <pad> (the blank) 0, <unk> 1, "|" (between words) 2, then every
    character of the transcripts in code-point order."""
    chars = sorted({c for t in texts for c in t} - {" "})
    return {tok: i for i, tok in enumerate([PAD, UNK, WORD, *chars])}


def character_tokenizer(texts: list[str]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.json"
        vocab.write_text(json.dumps(character_vocabulary(texts)))
        # no <s> and </s>: a CTC head writes characters only
        return Wav2Vec2CTCTokenizer(str(vocab), unk_token=UNK, pad_token=PAD, word_delimiter_token=WORD,
                                    bos_token=None, eos_token=None, do_lower_case=False)


class Collate:
    """A batch of clips padded by the feature extractor, and their transcripts as character ids
    (padding -100, which CTC's loss skips)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = self.processor.feature_extractor([b["audio"] for b in batch], sampling_rate=audio.SAMPLE_RATE,
                                                  padding=True, return_attention_mask=True, return_tensors="pt")
        labels = self.processor.tokenizer([b["text"] for b in batch], padding=True, return_tensors="pt",
                                          return_attention_mask=True)
        ids = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)
        return {"input_values": inputs["input_values"], "attention_mask": inputs["attention_mask"], "labels": ids}


# --- model --------------------------------------------------------------------------------


def architecture(run: StageRun) -> str:
    """The model type the stage trains: model.init's architecture, or the config's at model.uri."""
    if run.model_uri is None:
        if run.model_init is None:
            raise ValueError("the StageRun has neither modelUri nor modelInit; set spec.model.uri or spec.model.init")
        return run.model_init.architecture
    config = AutoConfig.from_pretrained(str(storage.local_path(run.model_uri)), trust_remote_code=run.trust_remote_code)
    return str(config.model_type)


def build(run: StageRun, spec: AsrSpec, texts: list[str]) -> tuple[Any, Any]:
    """(Wav2Vec2ForCTC, Wav2Vec2Processor): from run.modelUri, or built from run.modelInit."""
    kind = architecture(run)
    if kind == "whisper":
        raise ValueError("asr with Whisper is not implemented yet; kubetune trains wav2vec 2.0 CTC models today "
                         "(model.init architecture wav2vec2, or an audioPretrain stage before this one)")
    if kind not in CTC_MODEL_TYPES:
        raise ValueError(f"an asr stage trains wav2vec 2.0-style CTC models ({', '.join(CTC_MODEL_TYPES)}), "
                         f"not {kind}")
    cls = models.head_of(run).cls()
    if run.model_uri is None:
        assert run.model_init is not None
        tokenizer = character_tokenizer(texts)
        processor = Wav2Vec2Processor(feature_extractor=models.speech_feature_extractor(), tokenizer=tokenizer)
        model = cls.from_config(models.wav2vec2_config(run.model_init, **ctc_settings(spec, tokenizer)))
        log.info("Initialised model architecture=%s parameters=%d vocabulary=%d", kind,
                 models.count_parameters(model), len(tokenizer))
        return model, processor
    path = storage.local_path(run.model_uri)
    tokenizer = (Wav2Vec2CTCTokenizer.from_pretrained(str(path)) if (path / "vocab.json").exists()
                 else character_tokenizer(texts))
    unknown = sorted({c for t in texts for c in t} - set(tokenizer.get_vocab()) - {" "})
    if unknown:
        log.warning("Found characters the model's vocabulary lacks chars=%s; they are learned as %s", unknown, UNK)
    extractor = AutoFeatureExtractor.from_pretrained(str(path), trust_remote_code=run.trust_remote_code)
    processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    model = cls.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=run.trust_remote_code,
                                ignore_mismatched_sizes=True, **ctc_settings(spec, tokenizer))
    log.info("Loaded model uri=%s parameters=%d vocabulary=%d", run.model_uri, models.count_parameters(model),
             len(tokenizer))
    return model, processor


def ctc_settings(spec: AsrSpec, tokenizer: Any) -> dict[str, Any]:
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "ctc_loss_reduction": "mean",
            "ctc_zero_infinity": True, "mask_time_prob": spec.mask_time_prob,
            "mask_time_length": spec.mask_time_length, "layerdrop": 0.0}


# --- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def transcribe(model: Any, processor: Any, rows: list[dict[str, Any]]) -> list[str]:
    """Greedy CTC transcripts of the rows' clips."""
    model.eval()
    param = next(model.parameters())
    out: list[str] = []
    for start in range(0, len(rows), EVAL_BATCH):
        clips = [audio.load_audio(r["audio"]) for r in rows[start:start + EVAL_BATCH]]
        inputs = processor.feature_extractor(clips, sampling_rate=audio.SAMPLE_RATE, padding=True,
                                             return_attention_mask=True, return_tensors="pt")
        logits = model(input_values=inputs["input_values"].to(param.device, param.dtype),
                       attention_mask=inputs["attention_mask"].to(param.device)).logits
        out += [normalise(t) for t in processor.tokenizer.batch_decode(logits.argmax(-1))]
    return out


def scores(truth: list[str], said: list[str]) -> dict[str, float]:
    import jiwer

    return {"wordErrorRate": float(jiwer.wer(truth, said)), "characterErrorRate": float(jiwer.cer(truth, said))}


# --- the stage ----------------------------------------------------------------------------


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    spec = run.settings(AsrSpec)
    if run.tuning.method not in METHODS:
        raise ValueError(f"an asr stage trains with tuning.method {', '.join(METHODS)} today, not {run.tuning.method}")

    # --- load
    rows, held_out = common.load_data(run)
    rows = [{**r, "text": normalise(r["text"])} for r in rows]
    held_out = [{**r, "text": normalise(r["text"])} for r in held_out[:EVAL_LIMIT]]

    # --- build
    model, processor = build(run, spec, [r["text"] for r in rows])
    freeze = spec.freeze_feature_encoder if spec.freeze_feature_encoder is not None else run.model_uri is not None
    if freeze:
        model.freeze_feature_encoder()
    log.info("Built CTC model frozenFeatureEncoder=%s trainable=%d", freeze, models.count_parameters(model, trainable=True))
    truth = [r["text"] for r in held_out]

    before = said_before = None
    if ctx.is_main and held_out:
        said_before = transcribe(model, processor, held_out)
        before = scores(truth, said_before)
    common.barrier()

    augment = audio.Augment(seed=run.hyperparameters.seed + ctx.rank) if spec.augment else None
    args = common.training_args(
        run, ctx, TrainingArguments,
        remove_unused_columns=False,  # the collator reads "audio" and "text"
        include_num_input_tokens_seen="no",  # samples are no tokens
        label_names=["labels"],
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=audio.AudioRows(rows, lambda r: {"text": r["text"]}, augment),
        data_collator=Collate(processor),
        processing_class=processor,
        callbacks=ctx.callbacks,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, processor)

    after = sample = None
    if ctx.is_main and held_out:
        assert said_before is not None
        trained = models.head_of(run).cls().from_pretrained(str(ctx.out), dtype=torch.float32)
        said = transcribe(trained, Wav2Vec2Processor.from_pretrained(str(ctx.out)), held_out)
        after = scores(truth, said)
        sample = {"transcripts": [{"text": t, "before": b, "after": a}
                                  for t, b, a in list(zip(truth, said_before, said))[:SHOWN]],
                  "frozenFeatureEncoder": freeze}
    return common.report(run, ctx, trainer, before, after, sample, len(held_out))
