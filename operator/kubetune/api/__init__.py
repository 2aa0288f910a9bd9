"""The kubetune API (group kubetune.io, version v1alpha1): the single source of truth.

CRD schemas (`kubetune crds`), offline validation (`kubetune validate`), the operator and
the trainer's StageRun all come from the pydantic models in this package, and what defines a
stage type comes from its registry (`kubetune.api.registry`).

The names below are imported on first use, so `from kubetune.api import registry` reads the
registry alone: a stage type registered then is part of the models built after it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # explicit re-exports for type checkers; at run time __getattr__ imports on first use
    from kubetune.api.finetunejob import FORMATS_BY_STAGE as FORMATS_BY_STAGE
    from kubetune.api.finetunejob import IMPLEMENTED_STAGES as IMPLEMENTED_STAGES
    from kubetune.api.finetunejob import PREFERENCE_STAGES as PREFERENCE_STAGES
    from kubetune.api.finetunejob import FineTuneJob as FineTuneJob
    from kubetune.api.finetunejob import FineTuneJobSpec as FineTuneJobSpec
    from kubetune.api.finetunejob import FineTuneJobStatus as FineTuneJobStatus
    from kubetune.api.finetunejob import Stage as Stage
    from kubetune.api.finetunejob import StageStatus as StageStatus
    from kubetune.api.meta import API_VERSION as API_VERSION
    from kubetune.api.meta import GROUP as GROUP
    from kubetune.api.meta import VERSION as VERSION
    from kubetune.api.meta import Condition as Condition
    from kubetune.api.meta import find_condition as find_condition
    from kubetune.api.meta import is_true as is_true
    from kubetune.api.meta import set_condition as set_condition
    from kubetune.api.modeladapter import ModelAdapter as ModelAdapter
    from kubetune.api.modeladapter import ModelAdapterSpec as ModelAdapterSpec
    from kubetune.api.preferencedataset import FORMAT_BY_SCHEMA as FORMAT_BY_SCHEMA
    from kubetune.api.preferencedataset import PreferenceDataset as PreferenceDataset
    from kubetune.api.preferencedataset import PreferenceDatasetSpec as PreferenceDatasetSpec
    from kubetune.api.stagerun import StageData as StageData
    from kubetune.api.stagerun import StageRun as StageRun
    from kubetune.api.stagerun import render_stage_run as render_stage_run

_HOME = {
    "kubetune.api.finetunejob": (
        "FORMATS_BY_STAGE", "IMPLEMENTED_STAGES", "PREFERENCE_STAGES",
        "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "Stage", "StageStatus",
    ),
    "kubetune.api.meta": ("API_VERSION", "GROUP", "VERSION", "Condition", "find_condition", "is_true", "set_condition"),
    "kubetune.api.modeladapter": ("ModelAdapter", "ModelAdapterSpec"),
    "kubetune.api.preferencedataset": ("FORMAT_BY_SCHEMA", "PreferenceDataset", "PreferenceDatasetSpec"),
    "kubetune.api.stagerun": ("StageData", "StageRun", "render_stage_run"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'kubetune.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
