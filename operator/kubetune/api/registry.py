"""The stage registry: one typed entry per stage type, and everything derived from it.

    from kubetune.api import registry
    registry.get("dpo").formats            # ('preference',)
    registry.get("dpo").recipe             # 'dpo' -> kubetune_trainer/recipes/dpo.py

An entry says what a stage type reads (dataset formats, a PreferenceDataset or not), its
spec block (the typed settings under `spec.stages[].<type>`), what it needs (a reference
model, a reward model or reward functions), its defaults (learning rates), what it trains
(modality and model head), where its recipe lives, which held-out figure proves it learned,
and how its output is served. From this table come: the `StageType` enum and the type
blocks of `Stage` and `StageRun` (finetunejob.py, stagerun.py), the CEL rules (formats,
blocks, PreferenceDataset, text-only hyperparameters), the learning-rate defaults and their
help text, the "not implemented yet" refusals (validation.py, the trainer), and the trainer's
dispatch (`kubetune_trainer.launch`).

Adding a stage type is a block model and one row here, plus `recipes/<recipe>.py`. Rows are
read when `kubetune.api.finetunejob` is first imported; `register` adds one before that
(tests do, in a fresh interpreter), and refuses once the models are built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, StringConstraints
from typing_extensions import Annotated

from kubetune.api.meta import URI_PATTERN, KubeModel, cel, rules

Modality = Literal["text", "image", "audio"]
# The model a stage trains, as transformers' Auto classes name the heads:
#   causalLM                AutoModelForCausalLM
#   reward                  AutoModelForSequenceClassification with one output (a scalar score)
#   imageClassification     AutoModelForImageClassification
#   contrastiveImageText    CLIPModel
#   diffusionUNet           diffusers UNet2DConditionModel (with a CLIP text encoder)
#   speechSeq2Seq           AutoModelForSpeechSeq2Seq (Whisper)
#   ctc                     AutoModelForCTC (wav2vec 2.0 fine-tuning)
#   speechPretraining       Wav2Vec2ForPreTraining
Head = Literal[
    "causalLM", "reward", "imageClassification", "contrastiveImageText", "diffusionUNet",
    "speechSeq2Seq", "ctc", "speechPretraining",
]
# What a stage needs to score its samples: nothing, a reward model, or a reward model and/or
# built-in reward functions.
RewardSource = Literal["none", "model", "modelOrFunctions"]
# How a stage's output is served: vLLM (causal LMs on GPUs) or kubetune's own KServe server.
Serving = Literal["vllm", "kubetune"]

ShortString = Annotated[str, StringConstraints(min_length=1, max_length=128)]


# --- the spec blocks (spec.stages[].<type>) -----------------------------------------------


class SftSpec(KubeModel):
    completion_only_loss: bool = Field(
        default=True, description="Compute the loss on completions / assistant turns only, not on prompts."
    )
    chat_template: str | None = Field(
        default=None, max_length=65536,
        description="Jinja chat template for messages data; default: the model's own, else kubetune's ChatML template.",
    )


class RewardSpec(KubeModel):
    center_rewards_coefficient: float | None = Field(
        default=None, ge=0, le=1, description="Pull the mean reward toward zero with this weight (TRL RewardConfig)."
    )


class DpoSpec(KubeModel):
    beta: float = Field(default=0.1, gt=0, le=100, description="Strength of the pull toward the reference model.")
    loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        default="sigmoid", description="sigmoid: DPO; ipo: IPO; hinge: SLiC-style hinge loss."
    )
    label_smoothing: float = Field(default=0.0, ge=0, le=0.5, description="Assumed rate of flipped preference labels (cDPO).")


class KtoSpec(KubeModel):
    beta: float = Field(default=0.1, gt=0, le=100, description="Strength of the pull toward the reference model.")
    desirable_weight: float = Field(default=1.0, gt=0, le=100, description="Weight of desirable completions in the loss.")
    undesirable_weight: float = Field(default=1.0, gt=0, le=100, description="Weight of undesirable completions in the loss.")


class PpoSpec(KubeModel):
    """PPO's settings, with the defaults of TRL's last PPOConfig (see recipes/ppo.py)."""

    reward_model_uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description="Reward model scoring answers (default: the output of the job's last reward stage); it must use "
                    "the policy's tokenizer.",
    )
    kl_coef: float = Field(default=0.05, ge=0, le=10, description="Weight of the per-token KL penalty against the reference model.")
    kl_target: float | None = Field(
        default=None, gt=0, le=100,
        description="Adaptive KL (Ziegler et al.): steer klCoef so the mean KL per answer (nats) nears this; unset keeps klCoef fixed.",
    )
    kl_horizon: int = Field(default=10000, ge=1, le=10000000, description="Answers over which the adaptive klCoef moves by up to 20%.")
    kl_estimator: Literal["k1", "k3"] = Field(
        default="k1", description="KL estimate in the penalty: k1 = log pi/pi_ref; k3 = (r - 1) - log r, never negative (Schulman).",
    )
    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount over answer tokens.")
    gae_lambda: float = Field(default=0.95, ge=0, le=1, description="Lambda of generalised advantage estimation.")
    clip_range: float = Field(default=0.2, gt=0, le=1, description="The policy ratio is clipped to [1 - clipRange, 1 + clipRange].")
    value_clip_range: float = Field(default=0.2, gt=0, le=100, description="New values are clipped to within this of the rollout's values.")
    value_coef: float = Field(default=0.1, ge=0, le=10, description="Weight of the value loss.")
    ppo_epochs: int = Field(default=4, ge=1, le=100, description="Passes over each rollout batch.")
    mini_batches: int = Field(
        default=1, ge=1, le=1024,
        description="Optimizer steps per pass; a rollout is batchSize x gradientAccumulationSteps x miniBatches answers per process.",
    )
    max_completion_length: int = Field(
        default=53, ge=1, le=131072, description="Longest sampled answer in tokens; must be below hyperparameters.maxLength.",
    )
    temperature: float = Field(default=0.7, gt=0, le=10, description="Sampling temperature; log-probabilities use the same.")
    missing_eos_penalty: float = Field(
        default=1.0, ge=0, le=100, description="Subtracted from the score of an answer that never ends (0 turns it off).",
    )
    value_warmup_steps: int = Field(
        default=0, ge=0, le=100000,
        description="First steps train only the value model (OpenRLHF's freezing_actor_steps), so its advantages make sense first.",
    )
    normalize_scores: bool = Field(
        default=False, description="Scale reward-model scores to mean 0, std 1 on the starting policy's answers (lm-human-preferences).",
    )
    whiten_rewards: bool = Field(default=False, description="Whiten per-token rewards before GAE.")


RewardFunction = Literal["exactMatch", "numericMatch", "format", "lengthPenalty"]


class GrpoSpec(KubeModel, json_schema_extra=rules(
    cel("!('format' in self.rewardFunctions) || has(self.formatPattern)",
        "grpo.rewardFunctions has format: set grpo.formatPattern, the regular expression an answer must match"),
)):
    reward_functions: list[RewardFunction] = Field(
        default=["exactMatch"], max_length=4,
        description="Built-in rewards of each completion: exactMatch (1 when it equals the row's reference answer, "
                    "whitespace aside), numericMatch (1 when its last number equals the reference's), format (1 when "
                    "it matches formatPattern), lengthPenalty (minus its length over maxCompletionLength). Summed, "
                    "with the reward model's score when there is one. Empty: the reward model alone.",
    )
    format_pattern: str | None = Field(
        default=None, max_length=1024,
        description="Regular expression (Python re.fullmatch, on the stripped answer) of the format reward.",
    )
    reward_model_uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description="Reward model whose score is added to the rewards (default: the output of the job's last reward "
                    "stage, when there is one).",
    )
    num_generations: int = Field(default=8, ge=2, le=256, description="Completions sampled per prompt (the group).")
    max_completion_length: int = Field(default=256, ge=1, le=131072, description="Longest sampled completion in tokens.")
    beta: float = Field(
        default=0.04, ge=0, le=10,
        description="Weight of the KL penalty to the reference model (0.04 in DeepSeekMath's GRPO; 0 drops the "
                    "reference model).",
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        default="dapo",
        description="How token losses are aggregated, as TRL names it: grpo (per sequence, then mean), dr_grpo "
                    "(Dr. GRPO: a constant normaliser), dapo (over all tokens of the batch; TRL's default).",
    )
    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature of the completions.")
    num_iterations: int = Field(
        default=1, ge=1, le=16,
        description="Policy updates per batch of samples (GRPO's mu): each generation is reused this many times, "
                    "the ratio to the sampling policy clipped by epsilon.",
    )
    epsilon: float = Field(default=0.2, gt=0, le=1, description="Clip range of the policy ratio (PPO's epsilon).")


class ImageClassificationSpec(KubeModel):
    """How training images are augmented (held-out images are only resized, as served)."""

    horizontal_flip: bool = Field(
        default=True,
        description="Mirror training images left-right at random; turn it off when mirroring changes the class "
                    "(digits, text, arrows).",
    )
    crop_scale: float = Field(
        default=0.08, gt=0, le=1,
        description="Random resized crop: the smallest share of the image area a training crop keeps "
                    "(torchvision's default 0.08; 1 keeps the whole image).",
    )


class ClipSpec(KubeModel):
    """How training images are augmented, and the prompts of zero-shot classification."""

    prompt_template: str = Field(
        default="a photo of a {label}", min_length=1, max_length=256, pattern=r"\{label\}",
        description="Zero-shot classification (when the rows carry a label): the caption each class name is put "
                    "into, {label} standing for the name (the CLIP paper's prompt by default).",
    )
    horizontal_flip: bool = Field(
        default=False,
        description="Mirror training images left-right at random; off by default, since captions may say left "
                    "or right.",
    )
    crop_scale: float = Field(
        default=0.9, gt=0, le=1,
        description="Random resized crop: the smallest share of the image area a training crop keeps (OpenCLIP's "
                    "0.9; 1 keeps the whole image).",
    )


class UNetInit(KubeModel, json_schema_extra=rules(
    cel("self.blockOutChannels.all(c, c % self.normNumGroups == 0 && c % self.attentionHeadDim == 0)",
        "diffusion.unet.blockOutChannels must each be a multiple of normNumGroups and of attentionHeadDim"),
)):
    """A UNet2DConditionModel built from scratch, in diffusers' own config names."""

    sample_size: int = Field(
        ge=4, le=1024, description="Side in pixels of the square images it generates (training images are resized "
                                   "and centre-cropped to it).",
    )
    block_out_channels: list[int] = Field(
        default=[32, 64], min_length=1, max_length=6,
        description="Channels of each resolution level, from the full-resolution one down; each next level halves "
                    "the side. Every level but the first has cross-attention to the caption (as Stable "
                    "Diffusion's, whose highest-resolution levels are the costliest to attend over).",
    )
    layers_per_block: int = Field(default=1, ge=1, le=8, description="ResNet layers per level.")
    attention_head_dim: int = Field(
        default=8, ge=1, le=512,
        description="diffusers' attention_head_dim, which UNet2DConditionModel reads as the number of attention "
                    "heads of each level (as Stable Diffusion 1.x's config does).",
    )
    norm_num_groups: int = Field(default=16, ge=1, le=128, description="Groups of the GroupNorm layers.")


class DiffusionSpec(KubeModel):
    """Text-conditioned diffusion (Stable Diffusion's recipe): a UNet predicts the noise, conditioned on a frozen
    CLIP text encoder."""

    text_encoder_uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description="CLIP model (or CLIPTextModel) whose text tower and tokenizer condition the UNet; it stays "
                    "frozen. Default: the output of the job's last clip stage, else the text encoder of the "
                    "pipeline the stage starts from (model.uri or an earlier diffusion stage), else model.uri "
                    "itself when it is a CLIP model.",
    )
    unet: UNetInit | None = Field(
        default=None,
        description="Build the UNet from scratch with these sizes, when the stage starts from no diffusers "
                    "pipeline (a clip stage before it, or model.uri a CLIP model); the output is then a "
                    "pixel-space IFPipeline folder.",
    )
    snr_gamma: float | None = Field(
        default=None, gt=0, le=100,
        description="Min-SNR weighting of the loss (Hang et al. 2023): each timestep's MSE is weighted by "
                    "min(SNR, snrGamma) / SNR; 5 is the paper's choice. Unset: plain MSE on the noise.",
    )
    caption_dropout: float = Field(
        default=0.1, ge=0, lt=1,
        description="Share of training captions replaced by the empty caption, so the model also learns the "
                    "unconditional prediction that classifier-free guidance needs (Stable Diffusion's 0.1).",
    )
    horizontal_flip: bool = Field(
        default=False, description="Mirror training images left-right at random (diffusers' --random_flip).",
    )
    guidance_scale: float = Field(
        default=7.5, ge=1, le=50,
        description="Classifier-free guidance of the sample grids (1: none; Stable Diffusion's 7.5 by default).",
    )
    inference_steps: int = Field(
        default=50, ge=1, le=1000, description="Denoising steps of the sample grids (DDIM on the trained schedule).",
    )
    sample_captions: list[Annotated[str, StringConstraints(min_length=1, max_length=512)]] | None = Field(
        default=None, max_length=16,
        description="Captions of the sample grids made before and after training; default: the first distinct "
                    "held-out captions (up to 10).",
    )
    samples_per_caption: int = Field(default=4, ge=1, le=16, description="Images per caption in the sample grids.")


class AudioPretrainSpec(KubeModel):
    """wav2vec 2.0 self-supervised pretraining (Baevski et al. 2020), as transformers' pretraining example runs it."""

    mask_time_prob: float = Field(
        default=0.65, gt=0, lt=1,
        description="Share of frames to mask, in spans of maskTimeLength (transformers' mask_time_prob; spans "
                    "overlap, so 0.65 masks about half of each clip, as the paper's start probability 0.065 does).",
    )
    mask_time_length: int = Field(default=10, ge=1, le=100, description="Length of each masked span, in frames (20 ms each).")
    num_negatives: int = Field(
        default=100, ge=1, le=1000,
        description="Distractors sampled from the other masked frames of the same clip for each masked frame.",
    )
    diversity_loss_weight: float = Field(
        default=0.1, ge=0, le=10, description="Weight of the diversity loss that keeps every codevector in use.",
    )
    max_gumbel_temperature: float = Field(default=2.0, gt=0, le=100, description="Gumbel-softmax temperature of the quantizer at step 0.")
    min_gumbel_temperature: float = Field(default=0.5, gt=0, le=100, description="The temperature never falls below this.")
    gumbel_temperature_decay: float = Field(
        default=0.999995, gt=0, le=1,
        description="The temperature is multiplied by this at every optimizer step (the paper's schedule over "
                    "400k steps; lower it for short runs).",
    )


class AsrSpec(KubeModel):
    """Speech recognition: wav2vec 2.0 with a CTC head (a character vocabulary from the transcripts), or
    Whisper (an encoder-decoder writing the transcript's tokens after its language and task tokens)."""

    freeze_feature_encoder: bool | None = Field(
        default=None,
        description="Keep the convolutional feature encoder fixed (wav2vec 2.0 CTC fine-tuning). Default: frozen "
                    "when the model was pretrained (model.uri or an audioPretrain stage), trained when built "
                    "from model.init.",
    )
    mask_time_prob: float = Field(
        default=0.05, ge=0, lt=1,
        description="SpecAugment-style masking of time steps during training (wav2vec 2.0 CTC fine-tuning's 0.05; "
                    "Whisper: of log-Mel frames).",
    )
    mask_time_length: int = Field(default=10, ge=1, le=100, description="Length of each masked span, in frames.")
    language: str = Field(
        default="en", min_length=2, max_length=32,
        description="Whisper: the language of the transcripts, as a code or a name (en, english, de, ...); its "
                    "token follows <|startoftranscript|>.",
    )
    task: Literal["transcribe", "translate"] = Field(
        default="transcribe", description="Whisper: the task token; translate when the transcripts are English "
                                          "translations of speech in `language`.",
    )
    augment: bool = Field(
        default=True,
        description="Augment training clips with torchaudio: speed perturbation (0.9, 1.0, 1.1), white noise at "
                    "10-40 dB SNR and a gain of -6 to 6 dB, each drawn per clip; held-out clips never are.",
    )


# --- the table ----------------------------------------------------------------------------


def snake_case(name: str) -> str:
    """imageClassification -> image_classification (recipe files are snake_case)."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


@dataclass(frozen=True)
class StageTypeInfo:
    """Everything that defines one stage type."""

    name: str  # the `type` of a stage, camelCase
    formats: tuple[str, ...]  # dataset formats it reads (DatasetFormat names)
    modality: Modality
    head: Head
    learning_rates: tuple[float, float]  # default peak learning rate: (full, LoRA / QLoRA)
    primary: str  # the held-out figure that proves the stage learned (metrics.json `primary`)
    serving: Serving
    block: type[KubeModel] | None = None  # settings under spec.stages[].<name>
    block_help: str = ""  # the block's description, e.g. "Settings of dpo stages (DPO, IPO, hinge)."
    reference_model: bool = False  # trains against a frozen copy of the model it starts from
    preference_dataset: bool = False  # may read a PreferenceDataset
    reward: RewardSource = "none"
    text_encoder: bool = False  # conditions on a CLIP text encoder: its block's textEncoderUri or the last clip stage's
    implemented: bool = True  # the trainer has its recipe; otherwise refused as "not implemented yet"
    from_scratch: bool = False  # may be a job's first stage on a model built from spec.model.init
    architectures: tuple[str, ...] = ()  # the model.init architectures it builds from scratch (empty: its modality's)
    recipe: str = ""  # module under kubetune_trainer.recipes; default: the name in snake_case
    continues: tuple[str, ...] = ()  # heads (besides its own) of earlier stages whose output it starts from

    def __post_init__(self) -> None:
        if not self.recipe:
            object.__setattr__(self, "recipe", snake_case(self.name))
        if self.block is not None and not self.block_help:
            object.__setattr__(self, "block_help", f"Settings of {self.name} stages.")

    def builds(self, architecture: str) -> bool:
        """Whether a job's first stage of this type can start from a model.init of `architecture`."""
        if not self.from_scratch:
            return False
        if self.architectures:
            return architecture in self.architectures
        return ARCHITECTURES.get(architecture) == self.modality


_TEXT_CHAT = ("text", "promptCompletion", "messages")

STAGE_TYPES: dict[str, StageTypeInfo] = {t.name: t for t in (
    StageTypeInfo("pretrain", ("text",), "text", "causalLM", (3e-4, 3e-4), "evalLoss", "vllm", from_scratch=True),
    StageTypeInfo("sft", _TEXT_CHAT, "text", "causalLM", (2e-5, 2e-4), "exactMatch", "vllm", block=SftSpec),
    StageTypeInfo("reward", ("preference",), "text", "reward", (2e-5, 2e-4), "pairwiseAccuracy", "kubetune",
                  block=RewardSpec, preference_dataset=True),
    StageTypeInfo("ppo", ("promptCompletion", "messages"), "text", "causalLM", (1e-6, 1e-5), "meanReward", "vllm",
                  block=PpoSpec, reference_model=True, reward="model"),
    StageTypeInfo("dpo", ("preference",), "text", "causalLM", (1e-6, 5e-6), "preferenceAccuracy", "vllm",
                  block=DpoSpec, block_help="Settings of dpo stages (DPO, IPO, hinge).", reference_model=True,
                  preference_dataset=True),
    StageTypeInfo("kto", ("unpairedPreference", "preference"), "text", "causalLM", (1e-6, 5e-6), "desirableLogProb",
                  "vllm", block=KtoSpec, reference_model=True, preference_dataset=True),
    StageTypeInfo("grpo", ("promptCompletion", "messages"), "text", "causalLM", (1e-6, 1e-5), "exactMatch", "vllm",
                  block=GrpoSpec, reference_model=True, reward="modelOrFunctions"),
    StageTypeInfo("imageClassification", ("imageLabel",), "image", "imageClassification", (5e-5, 5e-4), "accuracy",
                  "kubetune", block=ImageClassificationSpec, from_scratch=True,
                  architectures=("vit", "convnext", "resnet")),
    StageTypeInfo("clip", ("imageCaption",), "image", "contrastiveImageText", (1e-5, 1e-4), "textToImageRecallAt1",
                  "kubetune", block=ClipSpec, from_scratch=True, architectures=("clip",)),
    StageTypeInfo("diffusion", ("imageCaption",), "image", "diffusionUNet", (1e-5, 1e-4), "evalLoss", "kubetune",
                  block=DiffusionSpec, block_help="Settings of diffusion stages (a text-conditioned UNet).",
                  text_encoder=True),
    # asr's head follows the model: wav2vec2 gets a CTC head, whisper is a seq2seq model (recipes/asr.py)
    StageTypeInfo("asr", ("audioTranscript",), "audio", "ctc", (1e-4, 1e-3), "wordErrorRate", "kubetune",
                  block=AsrSpec, block_help="Settings of asr stages (wav2vec 2.0 CTC and Whisper).", from_scratch=True,
                  architectures=("wav2vec2", "whisper"), continues=("speechPretraining",)),
    StageTypeInfo("audioPretrain", ("audio", "audioTranscript"), "audio", "speechPretraining", (5e-4, 5e-4),
                  "evalLoss", "kubetune", block=AudioPretrainSpec, block_help="Settings of audioPretrain stages "
                  "(wav2vec 2.0 masked contrastive pretraining).", from_scratch=True, architectures=("wav2vec2",)),
)}

# Architectures `spec.model.init` can build, and their modality (the speech stages add theirs).
ARCHITECTURES: dict[str, Modality] = {
    "llama": "text", "qwen2": "text", "gpt2": "text", "vit": "image", "convnext": "image", "resnet": "image",
    "clip": "image",  # a vision and a text tower (CLIPModel); its tokenizer is trained on the captions
    "wav2vec2": "audio",  # a convolutional feature encoder and a transformer on 16 kHz samples (20 ms frames)
    "whisper": "audio",  # an encoder on log-Mel frames and a decoder writing tokens (its tokenizer trained on the transcripts)
}

# --- tuning methods -------------------------------------------------------------------------


@dataclass(frozen=True)
class TuningMethodInfo:
    """One `tuning.method`: which weights train, and where its output can go."""

    name: str
    help: str  # one line for the CRD's description of tuning.method
    block: str = ""  # its settings block under `tuning` (camelCase), if any
    adapter: bool = True  # the stage writes an adapter beside a frozen base, not a whole model
    mergeable: bool = False  # the adapter folds into the base weights (`<out>/merged`)
    vllm_adapter: bool = False  # vLLM serves the adapter itself on its base (otherwise: merged, or not by vLLM)
    stage_types: tuple[str, ...] = ()  # the stage types it suits; empty: every stage type
    learning_rate: float | None = None  # default peak learning rate; None: the stage type's LoRA one

    @property
    def kept_apart(self) -> bool:
        """Writes an adapter that cannot be merged into its base: a next stage keeps training it, and it is
        served as an adapter on that base."""
        return self.adapter and not self.mergeable


TUNING_METHODS: dict[str, TuningMethodInfo] = {m.name: m for m in (
    TuningMethodInfo("full", "train every weight", adapter=False),
    TuningMethodInfo("lora", "low-rank update matrices beside frozen linear layers (Hu et al. 2021)",
                     block="lora", mergeable=True, vllm_adapter=True),
    TuningMethodInfo("qlora", "LoRA on a 4-bit (nf4) quantized base (Dettmers et al. 2023)", block="lora",
                     mergeable=True, vllm_adapter=True),
    TuningMethodInfo("ia3", "learned vectors that rescale keys, values and feed-forward activations (Liu et al. 2022)",
                     block="ia3", mergeable=True, stage_types=("sft", "dpo"), learning_rate=3e-3),
    TuningMethodInfo("promptTuning", "trainable virtual tokens before the input embeddings only (Lester et al. 2021)",
                     block="promptTuning", stage_types=("sft",), learning_rate=3e-2),
    TuningMethodInfo("prefixTuning", "trainable virtual key/value prefixes at every layer (Li and Liang 2021)",
                     block="prefixTuning", stage_types=("sft",), learning_rate=1e-2),
    TuningMethodInfo("adapter", "bottleneck modules after the attention and feed-forward blocks (Houlsby et al. 2019)",
                     block="adapter", stage_types=("sft",), learning_rate=1e-4),
)}


def tuning_method(name: str) -> TuningMethodInfo:
    try:
        return TUNING_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown tuning.method {name!r}; kubetune knows {', '.join(TUNING_METHODS)}") from None


_frozen = False


def register(info: StageTypeInfo) -> None:
    """Add a stage type before the API models are built (a plugin or a test in a fresh interpreter)."""
    if _frozen:
        raise RuntimeError(
            "register stage types before kubetune.api.finetunejob is imported: the models are built from the registry then"
        )
    if info.name in STAGE_TYPES:
        raise ValueError(f"stage type {info.name} is registered already")
    STAGE_TYPES[info.name] = info


def freeze() -> tuple[StageTypeInfo, ...]:
    """The rows, once and for all (called by finetunejob.py as it builds the models)."""
    global _frozen
    _frozen = True
    return tuple(STAGE_TYPES.values())


def get(name: str) -> StageTypeInfo:
    try:
        return STAGE_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown stage type {name!r}; kubetune knows {', '.join(STAGE_TYPES)}") from None


def names() -> tuple[str, ...]:
    return tuple(STAGE_TYPES)


def implemented() -> tuple[str, ...]:
    return tuple(t.name for t in STAGE_TYPES.values() if t.implemented)


def with_blocks() -> tuple[StageTypeInfo, ...]:
    return tuple(t for t in STAGE_TYPES.values() if t.block is not None)


def text_stages() -> tuple[str, ...]:
    return tuple(t.name for t in STAGE_TYPES.values() if t.modality == "text")


def block_field(cls: type[KubeModel]) -> str:
    """The `spec.stages[].<field>` (and StageRun field) that holds settings of type `cls`."""
    for t in STAGE_TYPES.values():
        if t.block is cls:
            return t.name
    raise ValueError(f"{cls.__name__} is no stage type's block")


def not_implemented_message(name: str) -> str:
    return f"stage type {name} is not implemented yet; kubetune runs {', '.join(implemented())} today"


def learning_rate_help() -> str:
    """The help text of hyperparameters.learningRate, from the table."""
    def fmt(x: float) -> str:
        return f"{x:.0e}".replace("e-0", "e-")

    parts = []
    for t in STAGE_TYPES.values():
        full, lora = t.learning_rates
        parts.append(f"{t.name} {fmt(full)}" + (f" ({fmt(lora)} with LoRA)" if lora != full else ""))
    methods = [f"{m.name} {fmt(m.learning_rate)}" for m in TUNING_METHODS.values() if m.learning_rate is not None]
    return ("Peak learning rate. Default per stage type: " + ", ".join(parts) + "; with the methods that train "
            "a few new parameters, per method: " + ", ".join(methods) + ".")
