"""PreferenceDataset (kubetune.io/v1alpha1, short name `prefds`): a validated comparison data set.

The operator runs `kubetune-train validate` on it in a Job and records what it found in
status; stages that reference it wait until it is Ready.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.meta import URI_PATTERN, Condition, KubeModel, ObjectMeta, cel, rules

PreferenceSchema = Literal["paired", "unpaired", "ranked"]

# The dataset format each schema is read as by the trainer.
FORMAT_BY_SCHEMA: dict[str, str] = {"paired": "preference", "unpaired": "unpairedPreference", "ranked": "preference"}


class PreferenceSource(KubeModel):
    uri: str = Field(
        pattern=URI_PATTERN, max_length=2048,
        description="Data file or folder (JSONL, JSON, Parquet, CSV or a datasets folder): file://, pvc://, s3:// or hf://.",
    )


class Split(KubeModel):
    validation_fraction: float = Field(default=0.1, ge=0.0, le=0.5, description="Fraction of rows held out for evaluation.")
    seed: int = Field(default=42, ge=0, le=2147483647, description="Seed of the split, so it is the same every time.")


class PreferenceDatasetSpec(KubeModel, json_schema_extra=rules(
    cel("self.source == oldSelf.source", "spec.source is immutable; create a new PreferenceDataset for other data"),
)):
    source: PreferenceSource = Field(description="Where the rows are.")
    schema_: PreferenceSchema = Field(
        alias="schema",
        description="paired: prompt, chosen, rejected; unpaired: prompt, completion, label; ranked: prompt, completions best first.",
    )
    columns: dict[str, str] | None = Field(
        default=None, description="Rename columns to the schema's names, e.g. {prompt: question, chosen: good}."
    )
    split: Split = Field(default_factory=lambda: Split(), description="The held-out split.")
    tokenizer_uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description=("A model or tokenizer folder (file://, pvc://, s3:// or hf://, usually the model the stages train) "
                     "whose tokenizer measures the rows: status.tokenStats gets the mean and max length in tokens of "
                     "each field. Without it, no tokenStats."),
    )


class RowError(KubeModel):
    line: int = Field(description="1-based line (JSONL, CSV) or row number of the bad row.")
    reason: str = Field(description="What is wrong with the row.")


class PreferenceDatasetStatus(KubeModel):
    observed_generation: int | None = Field(default=None, description="The .metadata.generation the status describes.")
    conditions: list[Condition] | None = Field(
        default=None, description="Ready (True when valid; False with reason Validating or Invalid).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    rows: int | None = Field(default=None, description="Rows read.")
    valid_rows: int | None = Field(default=None, description="Rows that passed validation.")
    train_rows: int | None = Field(default=None, description="Rows in the training split.")
    validation_rows: int | None = Field(default=None, description="Rows in the held-out split.")
    checksum: str | None = Field(default=None, description="sha256 of the source bytes.")
    token_stats: dict[str, float] | None = Field(default=None, description=(
        "Mean and max length in tokens of each field of the valid rows, by spec.tokenizerUri's tokenizer "
        "(promptMean, promptMax, chosenMean, ...)."))
    errors: list[RowError] | None = Field(default=None, description="The first bad rows, with their line numbers.")


class PreferenceDataset(KubeModel):
    api_version: Literal["kubetune.io/v1alpha1"] = Field(default="kubetune.io/v1alpha1", description="kubetune.io/v1alpha1")
    kind: Literal["PreferenceDataset"] = Field(default="PreferenceDataset", description="PreferenceDataset")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: PreferenceDatasetSpec = Field(description="The data set and how to read it.")
    status: PreferenceDatasetStatus | None = Field(default=None, description="What validation found.")
