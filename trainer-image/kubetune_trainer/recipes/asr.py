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
                        tuning: full.
    Whisper             WhisperForConditionalGeneration from model.uri (a Whisper checkpoint or a previous
                        stage) or built from model.init (architecture whisper, with a byte-level BPE
                        tokenizer trained on the transcripts and Whisper's special tokens, and an encoder
                        window of model.init.windowSeconds). The decoder learns
                        <|startoftranscript|><|language|><|task|><|notimestamps|> transcript <|endoftext|>
                        (asr.language, asr.task); the encoder's log-Mel frames see SpecAugment time masks
                        (Whisper's own apply_spec_augment). The saved generation config lets
                        `generate(features, language=..., task=...)` and transformers' ASR pipeline write
                        the prefix themselves. tuning: full, lora or qlora (peft; by default on the
                        attention's q_proj and v_proj when tuning.lora.targetModules is left at all-linear).

    augment     training clips only (asr.augment): speed perturbation 0.9/1.0/1.1, white noise at
                10-40 dB SNR, gain of -6..6 dB, all with torchaudio (data/audio.Augment)

Transcripts are lower-cased with runs of spaces collapsed (`normalise`), for training and scoring.
Held-out figures, before and after, by greedy decoding: wordErrorRate (the primary one) and
characterErrorRate (jiwer); metrics.json shows a few held-out transcripts beside the reference.
`Wav2Vec2ForCTC.from_pretrained` + `Wav2Vec2Processor.from_pretrained`, or
`WhisperForConditionalGeneration.from_pretrained` + `WhisperProcessor.from_pretrained`, load the stage
folder (with LoRA: `merged/`, or the adapter on its base).
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
from kubetune.api.finetunejob import TokenizerTrain
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    Trainer,
    TrainingArguments,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2Processor,
    WhisperProcessor,
    WhisperTokenizer,
)

from kubetune_trainer import common, models, storage
from kubetune_trainer.common import Context
from kubetune_trainer.data import audio

log = logging.getLogger("kubetune_trainer")

EVAL_LIMIT = 500  # held-out clips transcribed before and after
EVAL_BATCH = 16
SHOWN = 4  # held-out transcripts shown in metrics.json
PAD, UNK, WORD = "<pad>", "<unk>", "|"
METHODS = ("full",)  # CTC
WHISPER_METHODS = ("full", "lora", "qlora")
WHISPER_HEAD = "speechSeq2Seq"
LORA_TARGETS = ["q_proj", "v_proj"]  # Whisper's attention query and value (the LoRA paper's choice)
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
        return models.init_of(run).architecture
    config = AutoConfig.from_pretrained(str(storage.local_path(run.model_uri)), trust_remote_code=run.trust_remote_code)
    return str(config.model_type)


def build(run: StageRun, spec: AsrSpec, texts: list[str], kind: str) -> tuple[Any, Any]:
    """(Wav2Vec2ForCTC, Wav2Vec2Processor) of model type `kind`: from run.modelUri, or built from run.modelInit."""
    if kind not in CTC_MODEL_TYPES:
        raise ValueError(f"an asr stage trains Whisper or wav2vec 2.0-style CTC models ({', '.join(CTC_MODEL_TYPES)}), "
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


# --- Whisper -------------------------------------------------------------------------------


def whisper_build(run: StageRun, spec: AsrSpec, texts: list[str]) -> tuple[Any, Any]:
    """(WhisperForConditionalGeneration, WhisperProcessor): from run.modelUri (4-bit for qlora), or built from
    run.modelInit with a tokenizer trained on the transcripts (or model.init.tokenizer.uri's)."""
    cls = models.head_of(run, WHISPER_HEAD).cls()
    masking = {"apply_spec_augment": spec.mask_time_prob > 0, "mask_time_prob": spec.mask_time_prob,
               "mask_time_length": spec.mask_time_length}
    if run.model_uri is None:
        init = run.model_init
        assert init is not None
        if init.tokenizer is not None and init.tokenizer.uri is not None:
            tokenizer = WhisperTokenizer.from_pretrained(str(storage.local_path(init.tokenizer.uri)))
        else:
            train = (init.tokenizer.train if init.tokenizer is not None else None) or TokenizerTrain()
            tokenizer = models.whisper_tokenizer(texts, train.vocab_size, train.min_frequency, spec.language, spec.task)
        processor = WhisperProcessor(feature_extractor=models.whisper_feature_extractor(init.window_seconds or
                                                                                         models.WHISPER_WINDOW),
                                     tokenizer=tokenizer)
        model = cls.from_config(models.whisper_config(init, tokenizer, **masking))
        model.generation_config = models.whisper_generation_config(model.config, tokenizer, spec.language, spec.task)
        log.info("Initialised model architecture=whisper parameters=%d vocabulary=%d window=%ds",
                 models.count_parameters(model), len(tokenizer), processor.feature_extractor.chunk_length)
        return model, processor
    processor = WhisperProcessor.from_pretrained(str(storage.local_path(run.model_uri)))
    model = models.load_model(run, processor.tokenizer, head=WHISPER_HEAD)
    for key, value in masking.items():  # read while training (WhisperEncoder._mask_input_features)
        setattr(model.config, key, value)
    model.generation_config.language, model.generation_config.task = spec.language, spec.task
    return model, processor


def whisper_adapter(run: StageRun, model: Any) -> Any:
    """The model with LoRA on it for lora and qlora (by default on q_proj and v_proj); as it is for full."""
    config = models.peft_config(run)
    if config is None:
        return model
    if config.target_modules == "all-linear":
        config.target_modules = set(LORA_TARGETS)
    from peft import get_peft_model

    return get_peft_model(models.prepare_for_kbit(model, run), config)


def whisper_labels(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Token ids of <|language|><|task|><|notimestamps|> text <|endoftext|> (the model puts
    <|startoftranscript|>, its decoder start, in front itself), padding -100."""
    tokens = tokenizer([" " + t for t in texts], padding=True, return_tensors="pt", return_attention_mask=True)
    ids: torch.Tensor = tokens["input_ids"].masked_fill(tokens["attention_mask"].ne(1), -100)
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    return ids[:, 1:] if bool((ids[:, 0] == start).all()) else ids


class WhisperCollate:
    """Clips as log-Mel features padded to the window, transcripts as decoder labels, and the decoder's
    inputs (the labels shifted right behind <|startoftranscript|>: token_loss takes the labels away)."""

    def __init__(self, processor: Any, config: Any) -> None:
        self.processor = processor
        self.pad, self.start = config.pad_token_id, config.decoder_start_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from transformers.models.whisper.modeling_whisper import shift_tokens_right

        features = self.processor.feature_extractor([b["audio"] for b in batch], sampling_rate=audio.SAMPLE_RATE,
                                                    return_tensors="pt")["input_features"]
        labels = whisper_labels(self.processor.tokenizer, [b["text"] for b in batch])
        return {"input_features": features, "decoder_input_ids": shift_tokens_right(labels, self.pad, self.start),
                "labels": labels}


def token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy summed over the transcript tokens and divided by the tokens of the whole batch on every
    process (Trainer's num_items_in_batch): on several processes the gradient is the one of one process on all
    the clips. Whisper's own loss is the mean over each process's tokens, which Trainer would then multiply by
    the number of processes."""
    logits = outputs.logits.float()
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                                              ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum()
    return total / count


@torch.no_grad()
def whisper_transcribe(model: Any, processor: Any, rows: list[dict[str, Any]], spec: AsrSpec,
                       max_new_tokens: int) -> list[str]:
    """Greedy transcripts of the rows' clips: generate writes the language and task tokens itself."""
    model.eval()
    param = next(p for p in model.parameters() if p.is_floating_point())
    out: list[str] = []
    for start in range(0, len(rows), EVAL_BATCH):
        clips = [audio.load_audio(r["audio"]) for r in rows[start:start + EVAL_BATCH]]
        features = processor.feature_extractor(clips, sampling_rate=audio.SAMPLE_RATE,
                                               return_tensors="pt")["input_features"]
        ids = model.generate(input_features=features.to(param.device, param.dtype), language=spec.language,
                             task=spec.task, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        out += [normalise(t) for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


def check_window(rows: list[dict[str, Any]], processor: Any) -> None:
    """Refuse clips longer than the model's window (the feature extractor would cut their end off)."""
    window = float(processor.feature_extractor.chunk_length)
    long = [(i, len(audio.load_audio(r["audio"])) / audio.SAMPLE_RATE) for i, r in enumerate(rows)]
    long = [(i, s) for i, s in long if s > window]
    if long:
        shown = ", ".join(f"row {i + 1} ({s:.1f} s)" for i, s in long[:5])
        raise ValueError(f"{len(long)} clips are longer than the model's {window:.0f}-second window: {shown}; "
                         "cut them, or build the model with a longer model.init.windowSeconds")


def run_whisper(run: StageRun, spec: AsrSpec, ctx: Context, rows: list[dict[str, Any]],
                held_out: list[dict[str, Any]]) -> dict[str, Any]:
    # --- build
    models.check_tuning(run)
    model, processor = whisper_build(run, spec, [r["text"] for r in rows])
    if ctx.is_main:
        check_window(rows + held_out, processor)
    model = whisper_adapter(run, model)
    log.info("Built Whisper model trainable=%d", models.count_parameters(model, trainable=True))
    truth = [r["text"] for r in held_out]
    longest = max(len(processor.tokenizer(" " + r["text"]).input_ids) for r in rows)
    max_new_tokens = min(2 * longest + 4, model.config.max_target_positions - 4)

    before = said_before = None
    if ctx.is_main and held_out:
        said_before = whisper_transcribe(model, processor, held_out, spec, max_new_tokens)
        before = scores(truth, said_before)
    common.barrier()

    augment = audio.Augment(seed=run.hyperparameters.seed + ctx.rank) if spec.augment else None
    args = common.training_args(run, ctx, TrainingArguments, remove_unused_columns=False,
                                include_num_input_tokens_seen="no", label_names=["labels"])
    trainer = Trainer(model=model, args=args, train_dataset=audio.AudioRows(rows, lambda r: {"text": r["text"]}, augment),
                      data_collator=WhisperCollate(processor, model.config), compute_loss_func=token_loss,
                      processing_class=processor, callbacks=ctx.callbacks)

    # --- train
    common.train(trainer, ctx)

    # --- save
    def loader(path: str, dtype: Any) -> Any:  # the base under a LoRA adapter: Whisper's class, not the registry's CTC
        return models.load_base(run, path, dtype, WHISPER_HEAD)

    common.save(trainer, run, ctx, processor, loader)

    after = sample = None
    if ctx.is_main and held_out:
        assert said_before is not None
        trained = models.load_trained(run, ctx.out, loader, head=WHISPER_HEAD)
        said = whisper_transcribe(trained, WhisperProcessor.from_pretrained(str(ctx.out)), held_out, spec,
                                  max_new_tokens)
        after = scores(truth, said)
        sample = {"transcripts": [{"text": t, "before": b, "after": a}
                                  for t, b, a in list(zip(truth, said_before, said))[:SHOWN]]}
    return common.report(run, ctx, trainer, before, after, sample, len(held_out))


# --- the stage ----------------------------------------------------------------------------


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    spec = run.settings(AsrSpec)
    kind = architecture(run)
    methods = WHISPER_METHODS if kind == "whisper" else METHODS
    if run.tuning.method not in methods:
        raise ValueError(f"an asr stage trains {kind} models with tuning.method {', '.join(methods)}, "
                         f"not {run.tuning.method}")

    # --- load
    rows, held_out = common.load_data(run)
    rows = [{**r, "text": normalise(r["text"])} for r in rows]
    held_out = [{**r, "text": normalise(r["text"])} for r in held_out[:EVAL_LIMIT]]
    if kind == "whisper":
        return run_whisper(run, spec, ctx, rows, held_out)

    # --- build
    model, processor = build(run, spec, [r["text"] for r in rows], kind)
    freeze = spec.freeze_feature_encoder if spec.freeze_feature_encoder is not None else run.model_uri is not None
    if freeze:
        model.freeze_feature_encoder()
    # CTC's loss is a mean over each process's clips (of equal count), which DDP and DeepSpeed average: the global
    # mean. Trainer would otherwise take a forward with **kwargs for one that sums over the global batch and
    # multiply the loss by the number of processes (measured: twice the 1-process curve on 2).
    model.accepts_loss_kwargs = False
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
