"""FineTuneJob (kubetune.io/v1alpha1, short name `ftj`): a bounded pipeline of training stages.

The models here are the single source of truth: `kubetune crds` renders them into the CRD
schema (with the CEL rules attached through `rules(...)`), `kubetune validate` checks
manifests against them offline, and the operator and the local runner read specs with them.
"""

from __future__ import annotations

import builtins

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import Field, StringConstraints, create_model

from kubetune.api import registry
from kubetune.api.formats import DatasetFormat
from kubetune.api.meta import (
    DNS_LABEL,
    URI_PATTERN,
    Condition,
    KubeModel,
    ObjectMeta,
    cel,
    rules,
)

ShortString = Annotated[str, StringConstraints(min_length=1, max_length=128)]

_STAGE_TYPES = registry.freeze()  # the models below are built from the registry, once

if TYPE_CHECKING:
    StageType = str
else:
    StageType = Literal[tuple(t.name for t in _STAGE_TYPES)]

# Which dataset formats each stage type reads, and the stage types that may read a
# PreferenceDataset or have not got a recipe yet: views of the registry.
FORMATS_BY_STAGE: dict[str, tuple[str, ...]] = {t.name: t.formats for t in _STAGE_TYPES}
PREFERENCE_STAGES: tuple[str, ...] = tuple(t.name for t in _STAGE_TYPES if t.preference_dataset)
IMPLEMENTED_STAGES: tuple[str, ...] = tuple(t.name for t in _STAGE_TYPES if t.implemented)
TEXT_STAGES: tuple[str, ...] = tuple(t.name for t in _STAGE_TYPES if t.modality == "text")


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def _spoken(items: tuple[str, ...], conjunction: str = "and") -> str:
    """('a', 'b', 'c') -> 'a, b and c'."""
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}" if len(items) > 1 else "".join(items)


def _formats_rule() -> str:
    table = ", ".join(f"'{t}': {_cel_list(f)}" for t, f in FORMATS_BY_STAGE.items())
    return f"!has(self.dataset.format) || self.dataset.format in {{{table}}}[self.type]"


def _formats_message() -> str:
    parts = [f"{t} takes {' or '.join(f)}" for t, f in FORMATS_BY_STAGE.items()]
    return "dataset.format does not suit the stage type: " + "; ".join(parts) + "."


# --- the model a pipeline starts from -----------------------------------------------------


class TokenizerTrain(KubeModel):
    vocab_size: int = Field(
        default=8000, ge=256, le=262144, description="Vocabulary size of the byte-level BPE tokenizer to train."
    )
    min_frequency: int = Field(
        default=2, ge=1, le=1000, description="Minimum count for a merge to enter the vocabulary."
    )


class TokenizerInit(KubeModel, json_schema_extra=rules(
    cel("has(self.uri) != has(self.train)", "set exactly one of tokenizer.uri or tokenizer.train"),
)):
    uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description="Use an existing tokenizer from this uri (hf://, s3://, pvc://, file://).",
    )
    train: TokenizerTrain | None = Field(
        default=None, description="Train a byte-level BPE tokenizer on the first stage's text data."
    )


if TYPE_CHECKING:
    Architecture = str
else:
    Architecture = Literal[tuple(registry.ARCHITECTURES)]
TEXT_ARCHITECTURES = tuple(a for a, m in registry.ARCHITECTURES.items() if m == "text")
CONV_ARCHITECTURES = ("convnext", "resnet")  # stages of widths hiddenSize x 2^i
DEFAULT_IMAGE_SIZE = 224
DEFAULT_PATCH_SIZE = {"vit": 16, "convnext": 4, "clip": 32}


class ModelInit(KubeModel, json_schema_extra=rules(
    cel(f"!(self.architecture in {_cel_list(TEXT_ARCHITECTURES)}) || has(self.tokenizer)",
        "model.init.tokenizer is required for text architectures: set tokenizer.uri or tokenizer.train"),
    cel(f"!(self.architecture in {_cel_list(CONV_ARCHITECTURES)}) || self.numLayers <= 4",
        "model.init.numLayers counts the stages of convnext and resnet: at most 4"),
    cel(f"self.architecture != 'vit' || (has(self.imageSize) ? self.imageSize : {DEFAULT_IMAGE_SIZE}) % "
        f"(has(self.patchSize) ? self.patchSize : {DEFAULT_PATCH_SIZE['vit']}) == 0",
        "model.init.imageSize must be a multiple of patchSize for vit"),
    cel(f"self.architecture != 'clip' || (has(self.imageSize) ? self.imageSize : {DEFAULT_IMAGE_SIZE}) % "
        f"(has(self.patchSize) ? self.patchSize : {DEFAULT_PATCH_SIZE['clip']}) == 0",
        "model.init.imageSize must be a multiple of patchSize for clip"),
)):
    architecture: Architecture = Field(
        default="llama", description="Architecture to build from a config (Hugging Face model type)."
    )
    hidden_size: int = Field(
        default=64, ge=8, le=65536,
        description="Width of the hidden states (convnext and resnet: of the first stage; each next stage doubles it).",
    )
    num_layers: int = Field(
        default=2, ge=1, le=256,
        description="Number of transformer blocks (convnext and resnet: of stages, at most 4, each of 2 blocks).",
    )
    num_heads: int = Field(default=4, ge=1, le=512, description="Number of attention heads.")
    num_key_value_heads: int | None = Field(
        default=None, ge=1, le=512, description="Key/value heads for grouped-query attention (default: numHeads)."
    )
    intermediate_size: int | None = Field(
        default=None, ge=8, le=262144, description="Width of the MLP (default: 4 x hiddenSize for gpt2; 8/3 x for llama and qwen2, rounded up to a multiple of 32)."
    )
    max_position_embeddings: int = Field(
        default=512, ge=16, le=1048576, description="Longest sequence the model can attend over."
    )
    tokenizer: TokenizerInit | None = Field(
        default=None, description="The tokenizer (text architectures): an existing one, or one trained on the data. clip "
                                  "and whisper train one on the captions or transcripts when it is left out."
    )
    image_size: int | None = Field(
        default=None, ge=8, le=4096,
        description=f"Vision architectures: side in pixels of the square image the model sees (default {DEFAULT_IMAGE_SIZE}).",
    )
    patch_size: int | None = Field(
        default=None, ge=1, le=512,
        description="vit and clip: side in pixels of each patch (default 16 and 32); convnext: of the stem's patches "
                    "(default 4).",
    )
    window_seconds: int | None = Field(
        default=None, ge=1, le=30,
        description="whisper: seconds of audio the encoder hears at once, every clip padded to it (default 30, "
                    "Whisper's); a shorter window makes a small model much cheaper.",
    )


class ModelSource(KubeModel, json_schema_extra=rules(
    cel("has(self.uri) != has(self.init)", "set exactly one of spec.model.uri (start from a model) or spec.model.init (pretrain from scratch)"),
    cel("self == oldSelf", "spec.model is immutable; create a new FineTuneJob to train another model"),
)):
    uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description="Model to start from: hf://org/name, s3://bucket/path, pvc://claim/path or file:///path.",
    )
    init: ModelInit | None = Field(default=None, description="Build a new model from a config and pretrain it from scratch.")
    trust_remote_code: bool = Field(
        default=False, description="Allow the model's own Python code from its repository to run. Off unless you trust it."
    )


# --- one stage ----------------------------------------------------------------------------


class PreferenceDatasetRef(KubeModel):
    name: str = Field(pattern=DNS_LABEL, max_length=253, description="Name of a PreferenceDataset in the job's namespace.")


class DatasetSpec(KubeModel, json_schema_extra=rules(
    cel("has(self.uri) != has(self.preferenceDatasetRef)", "set exactly one of dataset.uri or dataset.preferenceDatasetRef"),
    cel("!has(self.uri) || has(self.format)", "dataset.format is required with dataset.uri"),
)):
    uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description="Data file or folder (JSONL, JSON, Parquet, CSV or a datasets folder): file://, pvc://, s3:// or hf://.",
    )
    format: DatasetFormat | None = Field(default=None, description="How the rows are shaped.")
    preference_dataset_ref: PreferenceDatasetRef | None = Field(
        default=None, description="Read a validated PreferenceDataset instead of a uri (reward, dpo and kto stages)."
    )
    columns: dict[str, str] | None = Field(
        default=None, description="Rename columns to the format's names, e.g. {prompt: question, completion: answer}."
    )
    validation_uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048, description="Held-out rows for evaluation, in the same format."
    )
    validation_fraction: float = Field(
        default=0.0, ge=0.0, le=0.5, description="Hold out this fraction of the rows for evaluation when no validationUri is set."
    )


class LoraSpec(KubeModel):
    r: int = Field(default=8, ge=1, le=1024, description="Rank of the LoRA update matrices.")
    alpha: int = Field(default=16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, le=0.9, description="Dropout on the LoRA input.")
    target_modules: list[ShortString] = Field(
        default=["all-linear"], min_length=1, max_length=64,
        description="Module names to adapt, or all-linear for every linear layer but the output head.",
    )
    use_dora: bool = Field(default=False, description="Use DoRA (weight-decomposed LoRA).")


class PromptTuningSpec(KubeModel):
    num_virtual_tokens: int = Field(
        default=20, ge=1, le=1024, description="Trainable virtual tokens put before every input's embeddings."
    )
    init_text: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="Start the virtual tokens from the embeddings of this text's tokens (repeated to fill them), "
                    "e.g. a description of the task; by default from embeddings of tokens drawn from the vocabulary, "
                    "which Lester et al. found better than random.",
    )


class PrefixTuningSpec(KubeModel, json_schema_extra=rules(
    cel("!has(self.projectionHiddenSize) || self.projection", "prefixTuning.projectionHiddenSize needs projection: true"),
)):
    num_virtual_tokens: int = Field(
        default=20, ge=1, le=1024, description="Length of the trainable key/value prefix put before every layer's attention."
    )
    projection: bool = Field(
        default=False,
        description="Produce the prefix through a two-layer MLP while training (Li and Liang's reparameterization, "
                    "steadier but with more trainable parameters).",
    )
    projection_hidden_size: int | None = Field(
        default=None, ge=1, le=65536, description="Hidden size of that MLP (default: the model's hidden size)."
    )


class Ia3Spec(KubeModel, json_schema_extra=rules(
    cel("!has(self.feedforwardModules) || (has(self.targetModules) && "
        "self.feedforwardModules.all(m, m in self.targetModules))",
        "ia3.feedforwardModules must be listed in ia3.targetModules too; set both"),
)):
    target_modules: list[ShortString] | None = Field(
        default=None, min_length=1, max_length=64,
        description="Modules whose activations are rescaled by a learned vector (default: PEFT's choice for the "
                    "architecture: keys, values and the feed-forward output, as in (IA)3).",
    )
    feedforward_modules: list[ShortString] | None = Field(
        default=None, min_length=1, max_length=64,
        description="Those of targetModules that are feed-forward layers: rescaled at their input rather than their output.",
    )


class AdapterSpec(KubeModel):
    reduction_factor: int = Field(
        default=16, ge=1, le=1024,
        description="Hidden size divided by the bottleneck size (AdapterHub's default 16; Houlsby et al. used "
                    "bottlenecks of 8 to 256 units).",
    )
    placement: Literal["houlsby", "pfeiffer"] = Field(
        default="houlsby",
        description="houlsby: an adapter after the attention and after the feed-forward block of every layer; "
                    "pfeiffer: after the feed-forward block only (half the parameters).",
    )
    activation: Literal["relu", "gelu", "silu"] = Field(default="silu", description="Non-linearity inside the bottleneck.")


_METHOD_BLOCKS = {  # the `tuning` field of each method's settings block
    "lora": LoraSpec, "ia3": Ia3Spec, "promptTuning": PromptTuningSpec, "prefixTuning": PrefixTuningSpec,
    "adapter": AdapterSpec,
}


def _tuning_rules() -> dict[str, Any]:
    out = []
    for block in _METHOD_BLOCKS:
        methods = [m.name for m in registry.TUNING_METHODS.values() if m.block == block]
        out.append(cel(f"!has(self.{block}) || self.method in {_cel_list(tuple(methods))}",
                       f"tuning.{block} is only for tuning.method {' or '.join(methods)}", f".{block}"))
    return rules(*out)


if TYPE_CHECKING:
    TuningMethod = str
else:
    TuningMethod = Literal[tuple(registry.TUNING_METHODS)]


class TuningSpec(KubeModel, json_schema_extra=_tuning_rules()):
    method: TuningMethod = Field(
        default="full",
        description="Which weights train. " + "; ".join(f"{m.name}: {m.help}" for m in registry.TUNING_METHODS.values()) + ".",
    )
    lora: LoraSpec | None = Field(default=None, description="LoRA settings (lora and qlora; defaults apply when left out).")
    ia3: Ia3Spec | None = Field(default=None, description="(IA)3 settings (method ia3).")
    prompt_tuning: PromptTuningSpec | None = Field(default=None, description="Prompt-tuning settings (method promptTuning).")
    prefix_tuning: PrefixTuningSpec | None = Field(default=None, description="Prefix-tuning settings (method prefixTuning).")
    adapter: AdapterSpec | None = Field(default=None, description="Bottleneck-adapter settings (method adapter).")


DEFAULT_MAX_LENGTH = 1024


class Hyperparameters(KubeModel):
    epochs: float = Field(default=1.0, gt=0, le=10000, description="Passes over the training data (ignored when maxSteps is set).")
    max_steps: int | None = Field(default=None, ge=1, le=100000000, description="Stop after this many optimizer steps.")
    learning_rate: float | None = Field(default=None, gt=0, le=1, description=registry.learning_rate_help())
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches summed per optimizer step.")
    max_length: int | None = Field(
        default=None, ge=8, le=1048576,
        description=f"Text stages only: longest tokenized example, longer ones are truncated (default {DEFAULT_MAX_LENGTH}).",
    )
    packing: bool | None = Field(
        default=None,
        description="Text stages only: pack several examples into each sequence of maxLength tokens, each keeping its "
                    "positions (default: on for SFT where the fast path has FlashAttention-2, off elsewhere).",
    )
    warmup_ratio: float = Field(default=0.0, ge=0, le=1, description="Fraction of the steps spent warming the learning rate up.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="linear", description="Shape of the learning-rate schedule."
    )
    seed: int = Field(default=42, ge=0, le=2147483647, description="Seed for weights, data order and dropout.")
    save_steps: int = Field(default=50, ge=1, le=100000000, description="Write a checkpoint every this many steps.")
    save_total_limit: int = Field(default=2, ge=1, le=100, description="Checkpoints to keep; older ones are deleted.")
    logging_steps: int = Field(default=5, ge=1, le=100000, description="Report metrics every this many steps.")
    eval_steps: int | None = Field(default=None, ge=1, le=100000000, description="Evaluate on held-out data every this many steps.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in the backward pass to save memory.")
    fast_path: bool = Field(
        default=True,
        description="Speed-ups that compute what the plain path does, each where the node has it: torch's fused AdamW; "
                    "on CUDA, Liger's fused kernels (liger-kernel installed), FlashAttention-2 for text models (flash-attn "
                    "installed) and with it SFT packing by default. false turns them all off.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="Compute precision; auto is bf16 on GPUs that have it and fp32 on CPU."
    )


class Toleration(KubeModel):
    key: str | None = Field(default=None, max_length=316, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists matches any value; Equal matches value.")
    value: str | None = Field(default=None, max_length=253, description="Taint value to match with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches every effect."
    )
    toleration_seconds: int | None = Field(default=None, ge=0, description="How long a NoExecute taint is tolerated.")


QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


class Resources(KubeModel):
    nodes: int = Field(default=1, ge=1, le=512, description="Nodes (pods) the stage runs on: one master plus nodes-1 workers.")
    gpus_per_node: int = Field(default=1, ge=0, le=16, description="GPUs per node; also the processes per node (0: one CPU process).")
    cpu: str | None = Field(default=None, pattern=QUANTITY, max_length=32, description="CPU request and limit per node, e.g. 16.")
    memory: str | None = Field(default=None, pattern=QUANTITY, max_length=32, description="Memory request and limit per node, e.g. 200Gi.")
    shm_size: str = Field(default="16Gi", pattern=QUANTITY, max_length=32, description="Size of the memory-backed /dev/shm.")
    node_selector: dict[str, str] | None = Field(default=None, description="Labels the nodes must carry.")
    tolerations: list[Toleration] | None = Field(default=None, max_length=32, description="Taints the pods tolerate.")


class DeepSpeedSpec(KubeModel, json_schema_extra=rules(
    cel("self.offload == 'none' || self.zeroStage >= 2", "deepspeed.offload needs zeroStage 2 or 3"),
)):
    zero_stage: int = Field(ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters.")
    offload: Literal["none", "cpu"] = Field(
        default="none", description="Offload optimizer states (and parameters with ZeRO-3) to CPU memory."
    )


class DistributedSpec(KubeModel):
    deepspeed: DeepSpeedSpec | None = Field(default=None, description="Shard training with DeepSpeed ZeRO; without it, plain DDP.")


B = TypeVar("B", bound=KubeModel)


def _stage_rules() -> dict[str, Any]:
    with_blocks = [t.name for t in _STAGE_TYPES if t.block is not None]
    return rules(
        cel(_formats_rule(), _formats_message()),
        cel(
            f"!has(self.dataset.preferenceDatasetRef) || self.type in {_cel_list(PREFERENCE_STAGES)}",
            f"dataset.preferenceDatasetRef is only for {_spoken(PREFERENCE_STAGES)} stages; use dataset.uri",
        ),
        *(cel(f"!has(self.{b}) || self.type == '{b}'", f"the {b} block is only for stages of type {b}") for b in with_blocks),
        *(
            cel(f"!has(self.tuning) || self.tuning.method != '{m.name}' || self.type in {_cel_list(m.stage_types)}",
                f"tuning.method {m.name} is for {_spoken(m.stage_types)} stages; use lora or full for this stage type",
                ".tuning.method")
            for m in registry.TUNING_METHODS.values() if m.stage_types
        ),
        cel(
            "!has(self.hyperparameters) || !(has(self.hyperparameters.maxLength) || has(self.hyperparameters.packing))"
            f" || self.type in {_cel_list(TEXT_STAGES)}",
            "hyperparameters.maxLength and packing are for text stages "
            f"({', '.join(TEXT_STAGES)}); remove them from this stage",
        ),
    )


class StageBase(KubeModel, json_schema_extra=_stage_rules()):
    """What every stage has; `Stage` adds the stage-type blocks of the registry."""

    name: str = Field(pattern=DNS_LABEL, max_length=40, description="Stage name (a DNS label, unique in the job).")
    type: StageType = Field(description="What the stage trains: the recipe the trainer runs.")
    dataset: DatasetSpec = Field(description="The stage's training data.")
    tuning: TuningSpec = Field(default_factory=lambda: TuningSpec(), description="Which weights train.")
    hyperparameters: Hyperparameters = Field(
        default_factory=lambda: Hyperparameters(), description="Optimisation settings common to every recipe."
    )
    resources: Resources = Field(default_factory=lambda: Resources(), description="Where and on how much hardware the stage runs.")
    distributed: DistributedSpec = Field(
        default_factory=lambda: DistributedSpec(), description="How the stage shards across processes."
    )

    def settings(self, cls: builtins.type[B]) -> B:
        """The stage-type block of class `cls` (e.g. DpoSpec), with its defaults when left out."""
        value = getattr(self, registry.block_field(cls), None)
        return value if isinstance(value, cls) else cls()


def block_fields(types: tuple[registry.StageTypeInfo, ...]) -> dict[str, Any]:
    """`create_model` fields for the stage-type blocks: `<type>: <Block> | None`."""
    return {
        t.name: (t.block | None, Field(default=None, description=t.block_help))
        for t in types if t.block is not None
    }


if TYPE_CHECKING:
    Stage = StageBase
else:
    Stage = create_model(
        "Stage", __base__=StageBase, __module__=__name__, __doc__="One stage of a FineTuneJob.",
        **block_fields(_STAGE_TYPES),
    )


class OutputSpec(KubeModel, json_schema_extra=rules(
    cel("self == oldSelf", "spec.output is immutable; create a new FineTuneJob to write elsewhere"),
)):
    uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description="Where stages write (<uri>/<stage>/); pvc:// or s3:// on a cluster, default runs/<job> locally.",
    )
    merge: bool = Field(default=False, description="Also write the final model with its LoRA adapter merged in.")


class PublishSpec(KubeModel):
    enabled: bool = Field(default=True, description="Create a ModelAdapter (and so a KServe InferenceService) when the job succeeds.")
    adapter_name: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=63, description="Name of the ModelAdapter to create (default: the job's name)."
    )
    runtime: Literal["vllm", "kubetune"] | None = Field(
        default=None,
        description="Serving runtime of the InferenceService: vllm (KServe's huggingface runtime, vLLM backend) or "
                    "kubetune (kubetune-serve, kubetune's KServe model server). Default: vllm for causal LMs vLLM "
                    "serves (whole models, LoRA adapters) on GPUs; kubetune for image and speech models, reward "
                    "models, adapters vLLM cannot load (IA3, prompt and prefix tuning, bottleneck adapters) and "
                    "gpus 0.",
    )
    gpus: int = Field(default=1, ge=0, le=16, description="GPUs of the serving pod.")
    share_server: bool = Field(
        default=True, description="Serve adapters on the same base model from one InferenceService."
    )


class Queue(KubeModel):
    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Queue name: a Kueue LocalQueue or a Volcano queue.")
    provider: Literal["kueue", "volcano"] = Field(default="kueue", description="Which batch scheduler owns the queue.")


class RunPolicy(KubeModel):
    backoff_limit: int = Field(default=3, ge=0, le=100, description=(
        "Pod restarts before a stage counts as failed. The training-operator sets no limit of its own, and the "
        "trainer marks running out of memory retryable, so without one a repeatable failure would restart forever."))
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Seconds a stage may run before it is stopped.")
    suspend: bool = Field(default=False, description="Pause the job: no new stage starts and a running stage is suspended.")
    queue: Queue | None = Field(default=None, description="Admit stages through a Kueue or Volcano queue.")


_NOT_VLLM = tuple(t.name for t in _STAGE_TYPES if t.serving != "vllm")
_KEPT_APART = tuple(m.name for m in registry.TUNING_METHODS.values() if m.kept_apart)


def _spec_rules() -> dict[str, Any]:
    kept = _cel_list(_KEPT_APART)
    last = "self.stages[size(self.stages) - 1]"
    return rules(
        cel(f"!has(self.publish) || !has(self.publish.runtime) || self.publish.runtime != 'vllm' || "
            f"!has({last}.tuning) || !({last}.tuning.method in {kept})",
            f"vLLM serves whole models and LoRA adapters only, not what {_spoken(_KEPT_APART, 'or')} train: "
            "set spec.publish.runtime kubetune (or leave it unset), or tune the last stage with lora, ia3 or full",
            ".publish"),
        cel(f"!has(self.publish) || !has(self.publish.runtime) || self.publish.runtime != 'vllm' || "
            f"!({last}.type in {_cel_list(_NOT_VLLM)})",
            f"vLLM serves causal LMs only, not what {_spoken(_NOT_VLLM, 'or')} stages train: set "
            "spec.publish.runtime kubetune (or leave it unset)", ".publish"),
    )


class FineTuneJobSpec(KubeModel, json_schema_extra=_spec_rules()):
    model: ModelSource = Field(description="Where the first stage starts.")
    stages: list[Stage] = Field(
        min_length=1, max_length=16,
        description="Stages in order; each starts from the previous stage's output.",
        json_schema_extra=rules(
            cel("self.all(x, self.exists_one(y, y.name == x.name))", "stage names must be unique"),
            cel("self == oldSelf", "spec.stages is immutable; create a new FineTuneJob to change the pipeline"),
        ),
    )
    output: OutputSpec = Field(default_factory=lambda: OutputSpec(), description="Where artifacts go.")
    publish: PublishSpec | None = Field(default=None, description="Serve the result through KServe when the job succeeds.")
    run_policy: RunPolicy = Field(default_factory=lambda: RunPolicy(), description="Retries, deadlines, suspension and queueing.")


# --- status -------------------------------------------------------------------------------

# Interrupted and exitCode: the local runner (`kubetune run`), where a stage can be cut short by Ctrl-C.
StageState = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Interrupted"]


class CheckpointRef(KubeModel):
    step: int = Field(ge=0, description="Optimizer step the checkpoint was saved at.")
    uri: str = Field(description="Where it is: <outputUri>/checkpoint-<step>.")


class StageStatus(KubeModel):
    name: str = Field(description="Stage name.")
    type: str = Field(description="Stage type.")
    state: StageState = Field(default="Pending", description="Where the stage stands.")
    job_name: str | None = Field(default=None, description="Name of the stage's PyTorchJob.")
    start_time: str | None = Field(default=None, description="When the stage started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the stage ended (RFC 3339).")
    output_uri: str | None = Field(default=None, description="Where the stage wrote its model.")
    last_checkpoint: CheckpointRef | None = Field(
        default=None, description="The newest complete checkpoint the trainer wrote; a restarted stage resumes from it.")
    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds left.")
    metrics: dict[str, float] | None = Field(default=None, description="Key metrics: loss, eval figures, throughput.")
    message: str | None = Field(default=None, description="Why the stage is in its state.")
    exit_code: int | None = Field(default=None, description="Exit code of the trainer when it failed or was interrupted.")
    tokens_trained: int | None = Field(default=None, ge=0, description=(
        "Input tokens the model has trained on (text stages), up to step: a stage resumed from a checkpoint counts "
        "from the checkpoint's figure, so steps redone after a restart are not counted twice."))
    samples_trained: int | None = Field(default=None, ge=0, description=(
        "Examples the model has trained on (image and audio stages), up to step: steps times batchSize times "
        "gradientAccumulationSteps times processes."))
    restarts: int | None = Field(default=None, ge=0, description=(
        "Times the stage's pods were started again, each one from lastCheckpoint: after a retryable failure "
        "(exit code 128-255: killed, out of memory, preempted), or when the master pod was deleted or lost with "
        "its node and the training-operator replaced it. Under the ExitCode restart policy a failed pod is "
        "replaced, not restarted in place, so the pods' own restart counts stay 0. A suspension does not count."))
    last_restart_time: str | None = Field(default=None, description="When the stage's pods were last restarted (RFC 3339).")
    master_pod_uid: str | None = Field(default=None, alias="masterPodUID", description=(
        "The uid of the stage's master pod when the operator last read its progress; a master pod of another uid, "
        "other than after a counted restart or a suspension, is a restart (deleted, or lost with its node)."))


class FineTuneJobStatus(KubeModel):
    observed_generation: int | None = Field(default=None, description="The .metadata.generation the status describes.")
    conditions: list[Condition] | None = Field(
        default=None, description="Accepted, Running, Suspended, Succeeded, Failed, Ready, Reconciling, Stalled.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    current_stage: str | None = Field(default=None, description="The stage running now, or the last one.")
    progress: str | None = Field(default=None, description="Stages done and the current stage's progress, e.g. 1/3 sft 42%.")
    stages: list[StageStatus] | None = Field(default=None, description="One entry per stage, in order.")
    adapter: str | None = Field(default=None, description="Name of the ModelAdapter the job published.")


class FineTuneJob(KubeModel):
    api_version: Literal["kubetune.io/v1alpha1"] = Field(default="kubetune.io/v1alpha1", description="kubetune.io/v1alpha1")
    kind: Literal["FineTuneJob"] = Field(default="FineTuneJob", description="FineTuneJob")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="The pipeline to run.")
    status: FineTuneJobStatus | None = Field(default=None, description="Where the pipeline stands.")


def stage_by_name(spec: FineTuneJobSpec, name: str) -> Stage:
    for s in spec.stages:
        if s.name == name:
            return s
    raise KeyError(name)

