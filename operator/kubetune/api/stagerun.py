"""StageRun: one stage of a FineTuneJob, resolved and ready for the trainer.

The seam between control plane and data plane. The operator (into a ConfigMap) and the
local runner (into `<output>/<stage>/stagerun.json`) both render it with `render_stage_run`;
`kubetune-train` reads nothing else.
"""

from __future__ import annotations

from pydantic import Field

from kubetune.api.finetunejob import (
    DatasetFormat,
    DistributedSpec,
    DpoSpec,
    FineTuneJob,
    GrpoSpec,
    Hyperparameters,
    KtoSpec,
    ModelInit,
    PpoSpec,
    RewardSpec,
    SftSpec,
    Stage,
    StageType,
    TuningSpec,
)
from kubetune.api.meta import KubeModel

KIND = "StageRun"
DEFAULT_METRICS_PORT = 9310


class StageData(KubeModel):
    uri: str = Field(description="Training rows (file://, pvc://, s3://, hf:// or a local path).")
    format: DatasetFormat = Field(description="How the rows are shaped.")
    columns: dict[str, str] | None = Field(default=None, description="Column renames applied on load.")
    validation_uri: str | None = Field(default=None, description="Held-out rows.")
    validation_fraction: float = Field(default=0.0, description="Fraction held out when there is no validationUri.")


class StageRun(KubeModel):
    kind: str = Field(default=KIND, description="StageRun")
    job: str = Field(description="Name of the FineTuneJob.")
    namespace: str | None = Field(default=None, description="Namespace of the FineTuneJob (none for local runs).")
    stage: str = Field(description="Stage name.")
    type: StageType = Field(description="Stage type: the recipe to run.")
    index: int = Field(description="0-based position of the stage in the pipeline.")
    stage_count: int = Field(description="Stages in the pipeline.")
    model_uri: str | None = Field(default=None, description="Model the stage starts from (the previous stage's output).")
    model_init: ModelInit | None = Field(default=None, description="Build a model from scratch (first stage only).")
    reference_model_uri: str | None = Field(default=None, description="Frozen reference model for dpo, kto and ppo.")
    trust_remote_code: bool = Field(default=False, description="Allow the model's own code to run.")
    dataset: StageData = Field(description="The stage's data.")
    tuning: TuningSpec = Field(description="Which weights train.")
    hyperparameters: Hyperparameters = Field(description="Optimisation settings.")
    sft: SftSpec | None = Field(default=None, description="sft settings.")
    reward: RewardSpec | None = Field(default=None, description="reward settings.")
    dpo: DpoSpec | None = Field(default=None, description="dpo settings.")
    kto: KtoSpec | None = Field(default=None, description="kto settings.")
    ppo: PpoSpec | None = Field(default=None, description="ppo settings.")
    grpo: GrpoSpec | None = Field(default=None, description="grpo settings.")
    distributed: DistributedSpec = Field(description="How the stage shards.")
    output_uri: str = Field(description="Where the stage writes model, tokenizer, checkpoints and metrics.json.")
    merge: bool = Field(default=False, description="Also write merged weights to <output>/merged (LoRA stages).")
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, description="Port of the Prometheus endpoint (0: off).")


def stage_output_uri(output_base: str, stage: Stage) -> str:
    return f"{output_base.rstrip('/')}/{stage.name}"


def stage_model_uri(output_base: str, stage: Stage) -> str:
    """What a stage hands to the next one: its model, or its merged weights after LoRA."""
    out = stage_output_uri(output_base, stage)
    return out if stage.tuning.method == "full" else f"{out}/merged"


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
    if index == 0:
        model_uri, model_init = spec.model.uri, spec.model.init
    else:
        model_uri, model_init = stage_model_uri(output_base, spec.stages[index - 1]), None
    last = index == len(spec.stages) - 1
    if dataset is None:
        d = stage.dataset
        if d.uri is None or d.format is None:
            raise ValueError(f"stage {stage.name}: dataset.preferenceDatasetRef must be resolved by the caller")
        dataset = StageData(
            uri=d.uri, format=d.format, columns=d.columns,
            validation_uri=d.validation_uri, validation_fraction=d.validation_fraction,
        )
    return StageRun(
        job=job.metadata.name,
        namespace=job.metadata.namespace,
        stage=stage.name,
        type=stage.type,
        index=index,
        stage_count=len(spec.stages),
        model_uri=model_uri,
        model_init=model_init,
        reference_model_uri=model_uri if stage.type in ("dpo", "kto", "ppo", "grpo") else None,
        trust_remote_code=spec.model.trust_remote_code,
        dataset=dataset,
        tuning=stage.tuning,
        hyperparameters=stage.hyperparameters,
        sft=stage.sft, reward=stage.reward, dpo=stage.dpo, kto=stage.kto, ppo=stage.ppo, grpo=stage.grpo,
        distributed=stage.distributed,
        output_uri=stage_output_uri(output_base, stage),
        merge=stage.tuning.method != "full" and (not last or spec.output.merge),
        metrics_port=metrics_port,
    )
