"""The kubetune API (group kubetune.io, version v1alpha1): the single source of truth.

CRD schemas (`kubetune crds`), offline validation (`kubetune validate`), the operator and
the trainer's StageRun all come from the pydantic models in this package.
"""

from kubetune.api.finetunejob import (
    FORMATS_BY_STAGE,
    IMPLEMENTED_STAGES,
    PREFERENCE_STAGES,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Stage,
    StageStatus,
)
from kubetune.api.meta import API_VERSION, GROUP, VERSION, Condition, find_condition, is_true, set_condition
from kubetune.api.modeladapter import ModelAdapter, ModelAdapterSpec
from kubetune.api.preferencedataset import FORMAT_BY_SCHEMA, PreferenceDataset, PreferenceDatasetSpec
from kubetune.api.stagerun import StageData, StageRun, render_stage_run

__all__ = [
    "API_VERSION", "GROUP", "VERSION", "Condition", "find_condition", "is_true", "set_condition",
    "FORMATS_BY_STAGE", "IMPLEMENTED_STAGES", "PREFERENCE_STAGES",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "Stage", "StageStatus",
    "ModelAdapter", "ModelAdapterSpec", "FORMAT_BY_SCHEMA", "PreferenceDataset", "PreferenceDatasetSpec",
    "StageData", "StageRun", "render_stage_run",
]
