"""StageRun: one stage of a FineTuneJob, resolved and ready for the trainer.

The seam between control plane and data plane. The operator (into a ConfigMap) and the
local runner (into `<output>/<stage>/stagerun.json`) both render it with `render_stage_run`;
`kubetune-train` reads nothing else.
"""

from __future__ import annotations

import builtins

from typing import TYPE_CHECKING, TypeVar

from pydantic import Field, create_model

from kubetune.api import registry
from kubetune.api.finetunejob import (
    DistributedSpec,
    FineTuneJob,
    Hyperparameters,
    ModelInit,
    Stage,
    StageType,
    TuningSpec,
    block_fields,
)
from kubetune.api.formats import DatasetFormat
from kubetune.api.meta import KubeModel

KIND = "StageRun"
DEFAULT_METRICS_PORT = 9310


class StageData(KubeModel):
    uri: str = Field(description="Training rows (file://, pvc://, s3://, hf:// or a local path).")
    format: DatasetFormat = Field(description="How the rows are shaped.")
    columns: dict[str, str] | None = Field(default=None, description="Column renames applied on load.")
    validation_uri: str | None = Field(default=None, description="Held-out rows.")
    validation_fraction: float = Field(default=0.0, description="Fraction held out when there is no validationUri.")


B = TypeVar("B", bound=KubeModel)


class StageRunBase(KubeModel):
    """What every StageRun has; `StageRun` adds the stage-type blocks of the registry."""

    kind: str = Field(default=KIND, description="StageRun")
    job: str = Field(description="Name of the FineTuneJob.")
    namespace: str | None = Field(default=None, description="Namespace of the FineTuneJob (none for local runs).")
    stage: str = Field(description="Stage name.")
    type: StageType = Field(description="Stage type: the recipe to run.")
    index: int = Field(description="0-based position of the stage in the pipeline.")
    stage_count: int = Field(description="Stages in the pipeline.")
    model_uri: str | None = Field(default=None, description="Model the stage starts from (the previous stage's output).")
    adapter_uri: str | None = Field(
        default=None,
        description="An adapter the stage keeps training on modelUri: the previous stage's, when its method cannot be "
                    "merged (promptTuning, prefixTuning, adapter).",
    )
    model_init: ModelInit | None = Field(default=None, description="Build a model from scratch (first stage only).")
    reference_model_uri: str | None = Field(
        default=None, description="Frozen reference model (stage types whose registry entry has one: dpo, kto, ppo, grpo)."
    )
    reward_model_uri: str | None = Field(
        default=None, description="Reward model scoring samples (ppo, grpo): the block's rewardModelUri or the last reward stage's output."
    )
    text_encoder_uri: str | None = Field(
        default=None,
        description="CLIP text encoder conditioning the stage (diffusion): the block's textEncoderUri or the last clip "
                    "stage's output; none: the one of the pipeline the stage starts from.",
    )
    trust_remote_code: bool = Field(default=False, description="Allow the model's own code to run.")
    dataset: StageData = Field(description="The stage's data.")
    tuning: TuningSpec = Field(description="Which weights train.")
    hyperparameters: Hyperparameters = Field(description="Optimisation settings.")
    distributed: DistributedSpec = Field(description="How the stage shards.")
    output_uri: str = Field(description="Where the stage writes model, tokenizer, checkpoints and metrics.json.")
    merge: bool = Field(default=False, description="Also write merged weights to <output>/merged (LoRA stages).")
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, description="Port of the Prometheus endpoint (0: off).")

    @property
    def info(self) -> registry.StageTypeInfo:
        """The registry entry of the stage's type."""
        return registry.get(self.type)

    def settings(self, cls: builtins.type[B]) -> B:
        """The stage-type block of class `cls` (e.g. DpoSpec), with its defaults when left out."""
        value = getattr(self, registry.block_field(cls), None)
        return value if isinstance(value, cls) else cls()


if TYPE_CHECKING:
    StageRun = StageRunBase
else:
    StageRun = create_model(
        "StageRun", __base__=StageRunBase, __module__=__name__,
        __doc__="One stage of a FineTuneJob, resolved: the trainer's only input.",
        **block_fields(registry.freeze()),
    )


def stage_output_uri(output_base: str, stage: Stage) -> str:
    return f"{output_base.rstrip('/')}/{stage.name}"


def stage_model_uri(output_base: str, stage: Stage) -> str:
    """What a stage hands to the next one: its model, or its merged weights after LoRA."""
    out = stage_output_uri(output_base, stage)
    return out if stage.tuning.method == "full" else f"{out}/merged"


def kept_apart(stage: Stage) -> bool:
    """The stage writes an adapter that cannot be merged into its base (prompt/prefix tuning, bottleneck adapters)."""
    return registry.tuning_method(stage.tuning.method).kept_apart


def start_of(job: FineTuneJob, index: int, output_base: str) -> tuple[str | None, str | None]:
    """(model, adapter) stage `index` starts from: the input stage's model, or, after a stage whose
    adapter cannot be merged, the model that stage started from plus its adapter (kept training)."""
    source = input_stage(job, index)
    if source is None:
        return job.spec.model.uri, None
    if kept_apart(source):
        base, _ = start_of(job, job.spec.stages.index(source), output_base)
        return base, stage_output_uri(output_base, source)
    return stage_model_uri(output_base, source), None


def input_stage(job: FineTuneJob, index: int) -> Stage | None:
    """The stage whose output stage `index` starts from; None: spec.model.

    The last earlier stage with the same model head, with a causal-LM head, or with a head the stage
    type `continues` (asr after audioPretrain: a CTC head on the pretrained encoder): a reward model
    branches off the policy line (InstructGPT's SFT -> reward model -> PPO), so it starts from the
    policy before it, and the stage after it starts from that policy again, not from the reward model.
    """
    info = registry.get(job.spec.stages[index].type)
    for stage in reversed(job.spec.stages[:index]):
        if registry.get(stage.type).head in (info.head, "causalLM", *info.continues):
            return stage
    return None


def reward_model_uri(job: FineTuneJob, index: int, output_base: str) -> str | None:
    """The reward model of stage `index`: its block's rewardModelUri, else the output of the
    last reward stage before it; None when the stage type needs none (or none is found)."""
    stage = job.spec.stages[index]
    if registry.get(stage.type).reward == "none":
        return None
    block = getattr(stage, stage.type, None)
    uri: str | None = getattr(block, "reward_model_uri", None)
    if uri:
        return uri
    earlier = [s for s in job.spec.stages[:index] if registry.get(s.type).head == "reward"]
    return stage_model_uri(output_base, earlier[-1]) if earlier else None


def text_encoder_uri(job: FineTuneJob, index: int, output_base: str) -> str | None:
    """The text encoder of stage `index` (stage types that condition on one): its block's textEncoderUri,
    else the output of the last clip stage before it; None: the pipeline's own, or model.uri's."""
    stage = job.spec.stages[index]
    if not registry.get(stage.type).text_encoder:
        return None
    uri: str | None = getattr(getattr(stage, stage.type, None), "text_encoder_uri", None)
    if uri:
        return uri
    earlier = [s for s in job.spec.stages[:index] if registry.get(s.type).head == "contrastiveImageText"]
    return stage_model_uri(output_base, earlier[-1]) if earlier else None


def render_stage_run(
    job: FineTuneJob,
    index: int,
    output_base: str,
    dataset: StageData | None = None,
    metrics_port: int = DEFAULT_METRICS_PORT,
) -> StageRun:
    """Resolve stage `index` of `job`: its input model, data, output and hand-off.

    `dataset` replaces the stage's own when the caller resolved a preferenceDatasetRef.
    """
    spec = job.spec
    stage = spec.stages[index]
    model_uri, adapter_uri = start_of(job, index, output_base)
    model_init = spec.model.init if index == 0 else None
    last = index == len(spec.stages) - 1
    if dataset is None:
        d = stage.dataset
        if d.uri is None or d.format is None:
            raise ValueError(f"stage {stage.name}: dataset.preferenceDatasetRef must be resolved by the caller")
        dataset = StageData(
            uri=d.uri, format=d.format, columns=d.columns,
            validation_uri=d.validation_uri, validation_fraction=d.validation_fraction,
        )
    info = registry.get(stage.type)
    blocks = {t.name: getattr(stage, t.name) for t in registry.with_blocks() if getattr(stage, t.name) is not None}
    method = registry.tuning_method(stage.tuning.method)
    publishing = spec.publish is not None and spec.publish.enabled
    # Merged weights for the next stage, when asked for, and when publishing what vLLM cannot serve as an adapter
    # (ia3; and any adapter of a model vLLM does not serve: kubetune-serve serves those merged).
    merge = method.mergeable and (not last or spec.output.merge
                                  or (publishing and (not method.vllm_adapter or info.serving != "vllm")))
    return StageRun(
        job=job.metadata.name,
        namespace=job.metadata.namespace,
        stage=stage.name,
        type=stage.type,
        index=index,
        stage_count=len(spec.stages),
        model_uri=model_uri,
        adapter_uri=adapter_uri,
        model_init=model_init,
        reference_model_uri=model_uri if info.reference_model else None,
        reward_model_uri=reward_model_uri(job, index, output_base),
        text_encoder_uri=text_encoder_uri(job, index, output_base),
        trust_remote_code=spec.model.trust_remote_code,
        dataset=dataset,
        tuning=stage.tuning,
        hyperparameters=stage.hyperparameters,
        **blocks,
        distributed=stage.distributed,
        output_uri=stage_output_uri(output_base, stage),
        merge=merge,
        metrics_port=metrics_port,
    )
