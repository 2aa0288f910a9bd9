"""kubetune-train STAGERUN.json   (a stage of type audioPretrain)

wav2vec 2.0 self-supervised pretraining (Baevski et al. 2020) on `audio` rows {audio} (or the clips
of `audioTranscript` rows, their transcripts unused), with transformers' Trainer:

    model       Wav2Vec2ForPreTraining from model.uri (a wav2vec 2.0 checkpoint or a previous stage)
                with its feature extractor, or built from model.init (architecture wav2vec2, small
                sizes: models.wav2vec2_config) with a 16 kHz feature extractor
    objective   as transformers' run_wav2vec2_pretraining_no_trainer example: spans of the encoder's
                frames are masked (`_compute_mask_indices`: audioPretrain.maskTimeProb, maskTimeLength);
                for each masked frame the transformer must pick its quantized target among
                audioPretrain.numNegatives distractors drawn from the clip's other masked frames
                (`_sample_negative_indices`): the contrastive loss, plus audioPretrain.
                diversityLossWeight x the diversity loss, which keeps the codebook in use. The
                loss is per masked frame. The quantizer's Gumbel-softmax temperature starts at
                maxGumbelTemperature and is multiplied by gumbelTemperatureDecay every step, down
                to minGumbelTemperature.
    tuning      full only (a pretrained encoder is what the next stage, asr, fine-tunes)

Clips are decoded and resampled to 16 kHz by data/audio.py. The stage folder holds the model and
its feature extractor (`Wav2Vec2ForPreTraining.from_pretrained` and `Wav2Vec2ForCTC.from_pretrained`
load it). Held-out figures, before and after, on the same masks and negatives: evalLoss (the
contrastive loss per masked frame, the primary one), diversityLoss, and codevectorPerplexity (how
many codevectors of the groups x codevectorsPerGroup in the codebook the held-out frames use: a
collapsed quantizer scores near the number of groups).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from kubetune.api import StageRun
from kubetune.api.registry import AudioPretrainSpec
from transformers import AutoFeatureExtractor, Trainer, TrainerCallback, TrainingArguments
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from kubetune_trainer import common, models, storage
from kubetune_trainer.common import Context
from kubetune_trainer.data import audio

log = logging.getLogger("kubetune_trainer")

EVAL_LIMIT = 500  # held-out clips scored before and after
EVAL_BATCH = 16
EVAL_SEED = 1234  # the masks and negatives of the held-out figures, the same before and after


# --- data ---------------------------------------------------------------------------------


class Collate:
    """A batch of clips padded by the feature extractor, with the masked frames and the sampled
    negatives of each (transformers' DataCollatorForWav2Vec2Pretraining, as a plain class)."""

    def __init__(self, feature_extractor: Any, model: Any, spec: AudioPretrainSpec) -> None:
        self.feature_extractor, self.model, self.spec = feature_extractor, model, spec

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = self.feature_extractor([b["audio"] for b in batch], sampling_rate=audio.SAMPLE_RATE,
                                        padding=True, return_attention_mask=True, return_tensors="pt")
        frames = int(self.model._get_feat_extract_output_lengths(inputs["input_values"].shape[-1]))
        shape = (len(batch), frames)
        frame_mask = self.model._get_feature_vector_attention_mask(frames, inputs["attention_mask"])
        masked = _compute_mask_indices(shape, self.spec.mask_time_prob, self.spec.mask_time_length,
                                       attention_mask=frame_mask, min_masks=2)
        negatives = _sample_negative_indices(shape, self.spec.num_negatives, mask_time_indices=masked)
        return {
            "input_values": inputs["input_values"],
            "attention_mask": inputs["attention_mask"],
            "mask_time_indices": torch.tensor(masked, dtype=torch.bool),
            "sampled_negative_indices": torch.tensor(negatives, dtype=torch.long),
        }


# --- model --------------------------------------------------------------------------------


def build(run: StageRun, spec: AudioPretrainSpec) -> tuple[Any, Any]:
    """(Wav2Vec2ForPreTraining, feature extractor): from run.modelUri, or built from run.modelInit."""
    cls = models.head_of(run).cls()
    settings = {"num_negatives": spec.num_negatives, "diversity_loss_weight": spec.diversity_loss_weight}
    if run.model_uri is None:
        init = models.init_of(run)
        if init.architecture != "wav2vec2":
            raise ValueError(f"an audioPretrain stage builds wav2vec2 from model.init, not {init.architecture}")
        model = cls(models.wav2vec2_config(init, **settings))
        log.info("Initialised model architecture=wav2vec2 parameters=%d", models.count_parameters(model))
        return model, models.speech_feature_extractor()
    path = str(storage.local_path(run.model_uri))
    model = cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=run.trust_remote_code, **settings)
    extractor = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=run.trust_remote_code)
    log.info("Loaded model uri=%s parameters=%d", run.model_uri, models.count_parameters(model))
    return model, extractor


def temperature(spec: AudioPretrainSpec, step: int) -> float:
    """The Gumbel-softmax temperature at an optimizer step."""
    return float(max(spec.max_gumbel_temperature * spec.gumbel_temperature_decay ** step, spec.min_gumbel_temperature))


class GumbelSchedule(TrainerCallback):
    """Sets the quantizer's temperature before each step (and where a resumed run left off)."""

    def __init__(self, spec: AudioPretrainSpec) -> None:
        self.spec = spec
        self.current = spec.max_gumbel_temperature

    def _set(self, model: Any, step: int) -> None:
        self.current = temperature(self.spec, step)
        getattr(model, "module", model).set_gumbel_temperature(self.current)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        self._set(model, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        self._set(model, state.global_step)


class PretrainTrainer(Trainer):
    """Trainer whose loss is wav2vec 2.0's per masked frame, and whose log adds the codebook's state."""

    def __init__(self, *args: Any, schedule: GumbelSchedule, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.seen: dict[str, list[float]] = {"contrastiveLoss": [], "diversityLoss": [], "codevectorPerplexity": []}

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = model(**inputs)
        masked = inputs["mask_time_indices"].sum().clamp(min=1)
        loss = out.loss / masked
        self.seen["contrastiveLoss"].append(float(out.contrastive_loss.detach() / masked))
        self.seen["diversityLoss"].append(float(out.diversity_loss.detach() / masked))
        self.seen["codevectorPerplexity"].append(float(out.codevector_perplexity.detach()))
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for key, values in self.seen.items():
                if values:
                    logs[key] = round(sum(values) / len(values), 4)
                values.clear()
            logs["gumbelTemperature"] = round(self.schedule.current, 4)
        super().log(logs, start_time)


# --- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: Any, feature_extractor: Any, rows: list[dict[str, Any]], spec: AudioPretrainSpec) -> dict[str, float]:
    """Held-out contrastive and diversity loss per masked frame, and codevector perplexity, on masks
    and negatives drawn from EVAL_SEED (the same for any model of the same frame rate)."""
    model.eval()
    collate = Collate(feature_extractor, model, spec)
    state = np.random.get_state()
    np.random.seed(EVAL_SEED)
    contrastive = diversity = masked = 0.0
    perplexities: list[float] = []
    try:
        for start in range(0, len(rows), EVAL_BATCH):
            batch = collate([{"audio": audio.load_audio(r["audio"])} for r in rows[start:start + EVAL_BATCH]])
            out = model(**batch)
            contrastive += float(out.contrastive_loss)
            diversity += float(out.diversity_loss)
            masked += float(batch["mask_time_indices"].sum())
            perplexities.append(float(out.codevector_perplexity))
    finally:
        np.random.set_state(state)
    model.train()
    n = max(masked, 1.0)
    return {"evalLoss": contrastive / n, "diversityLoss": diversity / n,
            "codevectorPerplexity": sum(perplexities) / max(len(perplexities), 1)}


# --- the stage ----------------------------------------------------------------------------


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    spec = run.settings(AudioPretrainSpec)
    if run.tuning.method != "full":
        raise ValueError(f"an audioPretrain stage trains the whole model: set tuning.method full, not {run.tuning.method}")

    # --- load
    rows, held_out = common.load_data(run)
    held_out = held_out[:EVAL_LIMIT]

    # --- build
    model, feature_extractor = build(run, spec)
    before = None
    if ctx.is_main and held_out:
        before = evaluate(model, feature_extractor, held_out, spec)
    common.barrier()

    schedule = GumbelSchedule(spec)
    args = common.training_args(
        run, ctx, TrainingArguments,
        remove_unused_columns=False,  # the collator reads "audio"
        include_num_input_tokens_seen="no",  # samples are no tokens
        label_names=[],
    )
    trainer = PretrainTrainer(
        model=model,
        args=args,
        train_dataset=audio.AudioRows(rows, lambda r: {}),
        data_collator=Collate(feature_extractor, model, spec),
        processing_class=feature_extractor,
        callbacks=[*ctx.callbacks, schedule],
        schedule=schedule,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, feature_extractor)

    after = None
    if ctx.is_main and held_out:
        trained = models.head_of(run).cls().from_pretrained(str(ctx.out), dtype=torch.float32)
        after = evaluate(trained, AutoFeatureExtractor.from_pretrained(str(ctx.out)), held_out, spec)
    sample = {"gumbelTemperature": schedule.current} if after else None
    return common.report(run, ctx, trainer, before, after, sample, len(held_out))
