"""Offline validation of kubetune manifests: what the API server would refuse, and more.

    kubetune validate examples/*.yaml

Three passes, each only when the one before found nothing:
1. the schema: the pydantic models (types, enums, bounds, patterns, unknown fields), strictly, on
   the object as the API server decodes it (`as_decoded`: nulls pruned, 2.0 an integer);
2. the CEL rules of the generated CRD, evaluated with cel-python on the defaulted object,
   so the rules are written once (in the models) and mean the same here and on the server;
3. semantic checks the schema cannot express (`semantic_problems`).
Every problem names its field path and says what to fix.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import celpy
import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api import crds, registry
from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.formats import FORMAT_FIELDS, fields
from kubetune.api.meta import API_VERSION
from kubetune.api.modeladapter import ModelAdapter
from kubetune.api.preferencedataset import PreferenceDataset
from kubetune.api.stagerun import input_stage, kept_apart

KINDS: dict[str, type[BaseModel]] = {
    "FineTuneJob": FineTuneJob,
    "PreferenceDataset": PreferenceDataset,
    "ModelAdapter": ModelAdapter,
}
_CRD_FILE = {
    "FineTuneJob": "kubetune.io_finetunejobs.yaml",
    "PreferenceDataset": "kubetune.io_preferencedatasets.yaml",
    "ModelAdapter": "kubetune.io_modeladapters.yaml",
}
SCHEMA_FIELDS: dict[str, tuple[str, ...]] = {
    "paired": FORMAT_FIELDS["preference"][0],
    "unpaired": FORMAT_FIELDS["unpairedPreference"][0],
    "ranked": ("prompt", "completions"),
}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("literal[", "function-")):
            continue
        else:
            out += f".{part}" if out else part
    return out or "(document)"


def _fix(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "missing":
        return "this field is required; add it"
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling (kubectl explain lists the fields)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        if "hf|s3|pvc|file" in pattern:
            return "must be a uri starting with hf://, s3://, pvc:// or file://"
        if pattern.startswith("^[a-z0-9]"):
            return "must be a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit"
        return f"must match {pattern}"
    return str(err["msg"]).replace("Input", "value").replace("input", "value")


@functools.cache
def _root_schema(kind: str) -> dict[str, Any]:
    root: dict[str, Any] = crds.render()[_CRD_FILE[kind]]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


_INT64 = (-(2**63), 2**63 - 1)


def as_decoded(schema: dict[str, Any], value: Any) -> Any:
    """`value` as the API server reads it against `schema`: a null field of an object is pruned (then
    defaulted, or missing when it is required), and a whole number in an integer field is an integer
    (JSON has one number type: the server takes 2.0 where it wants an integer, and refuses 2.5), one beyond
    int64 is a float, not an integer."""
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is None:
                out[k] = v  # unknown: refused as such, null or not
            elif v is not None:
                out[k] = as_decoded(sub, v)
        return out
    if isinstance(value, list):
        return [as_decoded(schema.get("items", {}), v) for v in value]  # a null item is refused, not pruned
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return float(value)  # beyond int64 the server's decoder reads a number as a float
    if schema.get("type") == "integer" and isinstance(value, float) and value.is_integer() and (
            _INT64[0] <= value < _INT64[1]):
        return int(value)
    return value


def schema_problems(kind: str, obj: dict[str, Any]) -> tuple[BaseModel | None, list[Problem]]:
    try:
        # by_name=False: manifests speak camelCase only (Python code may use snake_case names).
        # strict: no "3" for 3 or 1 for true; the API server takes a value of the schema's JSON type only.
        return KINDS[kind].model_validate(
            as_decoded(_root_schema(kind), obj), by_alias=True, by_name=False, strict=True), []
    except ValidationError as e:
        return None, [Problem(_path(err["loc"]), _fix(err)) for err in e.errors()]


_env = celpy.Environment()
_programs: dict[str, Any] = {}


def _evaluate(rule: str, value: Any) -> bool:
    if rule not in _programs:
        _programs[rule] = _env.program(_env.compile(rule))
    return bool(_programs[rule].evaluate({"self": celpy.json_to_cel(value)}))  # type: ignore[attr-defined]


def _walk_cel(schema: dict[str, Any], value: Any, path: str, out: list[Problem]) -> None:
    for v in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in v["rule"]:
            continue  # transition rules need the stored object; only the API server has it
        if not _evaluate(v["rule"], value):
            out.append(Problem(path + v.get("fieldPath", ""), v["message"]))
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _walk_cel(sub, value[name], f"{path}.{name}" if path else name, out)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _walk_cel(schema["items"], item, f"{path}[{i}]", out)


def cel_problems(kind: str, wire: dict[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    _walk_cel(_root_schema(kind), wire, "", out)
    return out


def _columns_problems(path: str, columns: dict[str, str] | None, allowed: tuple[str, ...]) -> list[Problem]:
    return [
        Problem(f"{path}.columns.{k}", f"unknown column {k!r}; this data has {', '.join(allowed)}")
        for k in (columns or {})
        if k not in allowed
    ]


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _diffusion_problems(job: FineTuneJob, i: int, p: str) -> list[Problem]:
    """A stage that conditions on a text encoder needs one, and a UNet to start from or sizes to build one.
    With spec.model.uri either may come from the pipeline there (known only when the trainer opens it)."""
    stage = job.spec.stages[i]
    info = registry.get(stage.type)
    if not info.text_encoder:
        return []
    block = getattr(stage, stage.type, None)
    out = []
    source = input_stage(job, i)
    from_pipeline = source is not None or job.spec.model.uri is not None
    clip_before = any(registry.get(s.type).head == "contrastiveImageText" for s in job.spec.stages[:i])
    if job.spec.model.uri is None and not clip_before and not getattr(block, "text_encoder_uri", None):
        out.append(Problem(f"{p}.{stage.type}.textEncoderUri",
                           f"a {stage.type} stage conditions on a CLIP text encoder: set {stage.type}.textEncoderUri, "
                           "or put a clip stage before it"))
    unet = getattr(block, "unet", None)
    if not from_pipeline and unet is None:
        out.append(Problem(f"{p}.{stage.type}.unet",
                           f"stage {stage.name} starts from no diffusers pipeline (spec.model.init builds the clip "
                           f"model): set {stage.type}.unet to build its UNet from scratch, e.g. "
                           "{sampleSize: 32, blockOutChannels: [32, 64]}"))
    if unet is not None and source is not None:
        out.append(Problem(f"{p}.{stage.type}.unet",
                           f"stage {stage.name} continues the pipeline of stage {source.name}: remove "
                           f"{stage.type}.unet, which builds a new UNet"))
    if unet is not None and stage.tuning.method != "full":
        out.append(Problem(f"{p}.tuning.method",
                           f"{stage.type}.unet builds a UNet with random weights, which have nothing to freeze; use "
                           "tuning.method: full"))
    return out


def semantic_problems(obj: BaseModel) -> list[Problem]:
    """Checks beyond the CRD that need no cluster (the operator adds the cluster ones)."""
    out: list[Problem] = []
    if isinstance(obj, PreferenceDataset):
        out += _columns_problems("spec", obj.spec.columns, SCHEMA_FIELDS[obj.spec.schema_])
        return out
    if not isinstance(obj, FineTuneJob):
        return out
    spec = obj.spec
    for i, stage in enumerate(spec.stages):
        p = f"spec.stages[{i}]"
        info = registry.get(stage.type)
        if not info.implemented:
            out.append(Problem(f"{p}.type", registry.not_implemented_message(stage.type)))
        block = stage.settings(info.block) if info.block is not None else None  # defaults when left out
        has_reward_model = bool(getattr(block, "reward_model_uri", None)) or any(
            registry.get(s.type).head == "reward" for s in spec.stages[:i])
        functions = getattr(block, "reward_functions", None)
        if info.reward == "model" and not has_reward_model:
            out.append(Problem(
                f"{p}.{stage.type}.rewardModelUri",
                f"a {stage.type} stage scores its samples with a reward model; set {stage.type}.rewardModelUri "
                "or put a reward stage before it",
            ))
        groups = getattr(block, "num_generations", None)
        hp, res = stage.hyperparameters, stage.resources
        processes = res.nodes * max(res.gpus_per_node, 1)
        if groups and (hp.batch_size * hp.gradient_accumulation_steps * processes) % groups:
            out.append(Problem(
                f"{p}.hyperparameters.batchSize",
                f"batchSize x gradientAccumulationSteps x processes ({hp.batch_size} x {hp.gradient_accumulation_steps}"
                f" x {processes}) must be a multiple of {stage.type}.numGenerations ({groups}): each step samples "
                "whole groups",
            ))
        if info.reward == "modelOrFunctions" and not has_reward_model and functions == []:
            out.append(Problem(
                f"{p}.{stage.type}.rewardFunctions",
                f"a {stage.type} stage needs something to score its samples: list built-in rewardFunctions, set "
                f"{stage.type}.rewardModelUri, or put a reward stage before it",
            ))
        if i == 0 and spec.model.init is not None:
            if stage.tuning.method != "full":
                out.append(Problem(
                    f"{p}.tuning.method",
                    "a model built from spec.model.init has no trained weights to freeze; use tuning.method: full",
                ))
            if not info.builds(spec.model.init.architecture):
                starters = [t.name for t in registry.STAGE_TYPES.values() if t.builds(spec.model.init.architecture)]
                out.append(Problem(
                    f"{p}.type",
                    f"a model built from spec.model.init ({spec.model.init.architecture}) starts from random weights; "
                    f"make the first stage {_article(' or '.join(starters) or 'other')} stage",
                ))
        out += _diffusion_problems(obj, i, p)
        source = input_stage(obj, i)
        if source is not None and kept_apart(source) and stage.tuning.method != source.tuning.method:
            out.append(Problem(
                f"{p}.tuning.method",
                f"stage {stage.name} starts from what stage {source.name} trained with tuning.method "
                f"{source.tuning.method}, which cannot be merged into the model, so it keeps training it: use "
                f"tuning.method {source.tuning.method} here, or tune stage {source.name} with lora or ia3",
            ))
        if stage.dataset.format:
            out += _columns_problems(f"{p}.dataset", stage.dataset.columns, fields(stage.dataset.format))
        if stage.tuning.method == "qlora" and stage.resources.gpus_per_node == 0:
            out.append(Problem(
                f"{p}.resources.gpusPerNode",
                "QLoRA without GPUs runs only with `kubetune run` on CPU, slowly; set gpusPerNode for a cluster",
                "warning",
            ))
        lr = stage.hyperparameters.learning_rate
        if lr is not None and lr > 1e-2 and stage.type != "pretrain" and stage.tuning.method == "full":
            out.append(Problem(
                f"{p}.hyperparameters.learningRate",
                f"{lr} is high for full fine-tuning and tends to wreck the model; 1e-5 to 1e-4 is usual",
                "warning",
            ))
    return out


def validate_object(obj: Any) -> list[Problem]:
    """Every problem of one manifest document, schema first."""
    if not isinstance(obj, dict):
        return [Problem("(document)", "a manifest must be a YAML mapping with apiVersion, kind, metadata and spec")]
    kind = obj.get("kind")
    if kind not in KINDS:
        return [Problem("kind", f"unknown kind {kind!r}; kubetune defines {', '.join(KINDS)}")]
    if obj.get("apiVersion") != API_VERSION:
        return [Problem("apiVersion", f"must be {API_VERSION}")]
    model, problems = schema_problems(kind, obj)
    if model is None:
        return problems
    problems = cel_problems(kind, model.model_dump(mode="json", by_alias=True, exclude_none=True))
    if problems:
        return problems
    return semantic_problems(model)


class _KubectlLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: 1e-5 is a number too (PyYAML's YAML 1.1 floats need a dot, 1.0e-5), so
    that the strict schema pass refuses no number the API server would take."""


_KubectlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def load_documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.load_all(f, Loader=_KubectlLoader) if d is not None]


def validate_file(path: Path) -> list[tuple[str, list[Problem]]]:
    """(document label, problems) for each document of a YAML file."""
    try:
        docs = load_documents(path)
    except yaml.YAMLError as e:
        return [(str(path), [Problem("(file)", f"not valid YAML: {e}")])]
    results = []
    for i, doc in enumerate(docs):
        name = doc.get("metadata", {}).get("name", f"#{i}") if isinstance(doc, dict) else f"#{i}"
        kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
        results.append((f"{kind}/{name}", validate_object(doc)))
    return results
