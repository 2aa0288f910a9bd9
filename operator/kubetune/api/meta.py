"""Shared pieces of the kubetune API: the base model, metav1.Condition and its helpers.

Every API type derives from `KubeModel`: camelCase on the wire, snake_case in Python,
unknown fields refused (the CRD schemas are structural, so the API server prunes them;
offline we say so instead of dropping them silently).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
URI_PATTERN = r"^(hf|s3|pvc|file)://.+"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry (a CEL rule the API server evaluates)."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def rules(*entries: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` for a model (or field) that carries CEL rules."""
    return {"x-kubernetes-validations": list(entries)}


class KubeModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta kubetune reads; everything else is kept as is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(description="Name of the object, unique in its namespace.")
    namespace: str | None = Field(default=None, description="Namespace of the object.")
    labels: dict[str, str] | None = Field(default=None, description="Labels of the object.")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations.")
    generation: int | None = Field(default=None, description="Generation of the spec.")
    uid: str | None = Field(default=None, description="Unique id given by the API server.")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(KubeModel):
    """metav1.Condition: one aspect of an object's state, as `kubectl wait` reads it."""

    type: str = Field(description="Type of condition in CamelCase, e.g. Succeeded or Ready.", max_length=316)
    status: ConditionStatus = Field(description="Status of the condition: True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this condition was set for."
    )
    last_transition_time: str = Field(
        description="Last time the condition's status changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    reason: str = Field(
        description="One CamelCase word saying why the condition has its status.",
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
    )
    message: str = Field(default="", description="A sentence for a person, saying what happened.", max_length=32768)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[dict[str, Any]],
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
) -> list[dict[str, Any]]:
    """apimachinery's SetStatusCondition on wire dicts; returns the whole new list.

    `lastTransitionTime` moves only when `status` changes. kopf merge-patches status, and
    a list is replaced whole, so callers write back the returned list.
    """
    out = [dict(c) for c in conditions]
    for c in out:
        if c.get("type") == type:
            if c.get("status") != status:
                c["lastTransitionTime"] = now_rfc3339()
            c.update(status=status, reason=reason, message=message)
            if observed_generation is not None:
                c["observedGeneration"] = observed_generation
            return out
    new: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_rfc3339(),
    }
    if observed_generation is not None:
        new["observedGeneration"] = observed_generation
    out.append(new)
    return out


def find_condition(conditions: list[dict[str, Any]] | None, type: str) -> dict[str, Any] | None:
    for c in conditions or []:
        if c.get("type") == type:
            return c
    return None


def is_true(conditions: list[dict[str, Any]] | None, type: str) -> bool:
    c = find_condition(conditions, type)
    return c is not None and c.get("status") == "True"
