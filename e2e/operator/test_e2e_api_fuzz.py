"""Fuzzed FineTuneJobs: `kubetune validate` and the real API server refuse the same manifests.

    .venv/bin/python -m pytest e2e/operator/test_e2e_api_fuzz.py -s

Hypothesis makes FineTuneJob manifests: valid ones (the FineTuneJobs of examples/, and jobs
built from the stage registry with settings drawn from the CRD schema) and mutations of them:
wrong types, numbers out of range, missing and extra fields, unknown enum values, strings that
break a pattern or a length, nulls, and edits that break a cross-field CEL rule. Each case
goes to the schema and CEL passes of `kubetune validate` and to the API server as a server-side
dry run with strict field validation (what `kubectl apply --dry-run=server` sends). Both must
accept it or both refuse it, and every refusal, on either side, must name a field.

N_CASES (1500) cases with seed SEED, without an example database, so CI runs the same cases
every time; about a minute and a half here. The test prints how many ran and how each was judged.

Set aside on purpose:
- the semantic checks of `kubetune validate` (`semantic_problems`: reward sources, group
  sizes, what a model built from spec.model.init can start with, ...): they need no cluster
  but go beyond what a CRD can say, so the API server does not make them and only the schema
  and CEL passes are compared;
- transition rules (`self == oldSelf`): a create has no old object;
- metadata: it is the API server's ObjectMeta, not kubetune's schema, so it is not mutated.

Found by it and mended: nulls the server drops and defaults, types pydantic coerced and the
server refuses (`batchSize: "3"`), integers beyond int64 (validation.as_decoded, strict
validation); and valid jobs the server refused because a CEL rule read a list whose default the
CRD lacked (grpo.rewardFunctions, diffusion.unet.blockOutChannels: pydantic writes no `default`
for a default_factory, so those fields now have plain defaults).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from kubernetes import client

from e2e.conftest import REPO, fresh_namespace
from e2e.operator.conftest import FTJ
from kubetune.api import crds, registry
from kubetune.api.finetunejob import QUANTITY
from kubetune.api.meta import DNS_LABEL, URI_PATTERN
from kubetune.api.validation import Problem, cel_problems, schema_problems

SEED = 20261505  # issue 15, item 5
N_CASES = 1500

CRD = yaml.safe_load((REPO / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
SPEC = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
STAGE = SPEC["properties"]["stages"]["items"]
EXAMPLES = [doc for path in sorted((REPO / "examples").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob"]

Path = tuple[str | int, ...]
Schema = dict[str, Any]


# --- values the schema allows ---------------------------------------------------------------

URIS = st.sampled_from(["hf://org/model", "s3://bucket/train.jsonl", "pvc://data/train.jsonl", "file:///data/x"])
PATTERNS: dict[str, st.SearchStrategy[str]] = {
    URI_PATTERN: URIS,
    DNS_LABEL: st.from_regex(r"[a-z]([-a-z0-9]{0,8}[a-z0-9])?", fullmatch=True),
    QUANTITY: st.sampled_from(["16", "200Gi", "500m", "1.5Ti"]),
    r"\{label\}": st.sampled_from(["a photo of a {label}", "{label}"]),
}
TEXT = st.characters(exclude_categories=["Cs"])  # any code point JSON can carry


def allowed(schema: Schema, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values the OpenAPI part of `schema` accepts (CEL rules may still refuse them); optional
    fields only at the top, so that a drawn stage stays small."""
    kind = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = schema.get("minimum", -5) + bool(schema.get("exclusiveMinimum"))
        return st.integers(low, schema.get("maximum", low + 1000) - bool(schema.get("exclusiveMaximum")))
    if kind == "number":
        low = schema.get("minimum", -5.0)
        return st.floats(low, schema.get("maximum", low + 1000), exclude_min=bool(schema.get("exclusiveMinimum")),
                         exclude_max=bool(schema.get("exclusiveMaximum")), allow_nan=False, allow_infinity=False)
    if kind == "string":
        if "pattern" in schema:
            return PATTERNS[schema["pattern"]]
        return st.text(TEXT, min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 12), 12))
    if kind == "array":
        return st.lists(allowed(schema["items"], depth + 1), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 3), 3))
    if "properties" in schema:
        props, required = schema["properties"], schema.get("required", [])
        optional = {} if depth else {k: allowed(s, 1) for k, s in props.items() if k not in required}
        return st.fixed_dictionaries({k: allowed(props[k], depth + 1) for k in required}, optional=optional)
    if "additionalProperties" in schema:
        return st.dictionaries(st.from_regex(r"[a-z][A-Za-z0-9]{0,7}", fullmatch=True),
                               allowed(schema["additionalProperties"], depth + 1), max_size=3)
    return st.just({})


# --- valid jobs: the examples and the registry ----------------------------------------------

@st.composite
def registry_stage(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """A stage of any registered type, reading a format it takes, tuned by a method it allows."""
    info = draw(st.sampled_from(list(registry.STAGE_TYPES.values())))
    stage: dict[str, Any] = {"name": name, "type": info.name,
                             "dataset": {"uri": draw(URIS), "format": draw(st.sampled_from(info.formats))}}
    methods = [m.name for m in registry.TUNING_METHODS.values() if not m.stage_types or info.name in m.stage_types]
    if draw(st.booleans()):
        stage["tuning"] = {"method": draw(st.sampled_from(methods))}
    if info.block is not None and draw(st.booleans()):
        stage[info.name] = draw(allowed(STAGE["properties"][info.name]))
    for block in ("hyperparameters", "resources", "distributed"):
        if draw(st.integers(0, 3)) == 0:
            stage[block] = draw(allowed(STAGE["properties"][block]))
    if info.modality != "text":
        stage.get("hyperparameters", {}).pop("maxLength", None)
        stage.get("hyperparameters", {}).pop("packing", None)
    return stage


@st.composite
def valid_jobs(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    count = draw(st.integers(1, 3))
    spec = {"model": {"uri": draw(URIS)}, "stages": [draw(registry_stage(f"stage-{i}")) for i in range(count)]}
    for block in ("output", "publish", "runPolicy"):
        if draw(st.integers(0, 2)) == 0:
            spec[block] = draw(allowed(SPEC["properties"][block]))
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "fuzzed"}, "spec": spec}


# --- where a mutation can land ----------------------------------------------------------------

def nodes(value: Any, schema: Schema, path: Path) -> Iterator[tuple[Path, Any, Schema]]:
    """Every value of the document under `path` that the schema describes, with its schema."""
    yield path, value, schema
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in value.items():
            if key in props:
                yield from nodes(sub, props[key], (*path, key))
            elif "additionalProperties" in schema:
                yield from nodes(sub, schema["additionalProperties"], (*path, key))
    elif isinstance(value, list) and "items" in schema:
        for i, sub in enumerate(value):
            yield from nodes(sub, schema["items"], (*path, i))


def slots(doc: dict[str, Any]) -> list[tuple[Path, Schema]]:
    """Every field of an object that is in the document, set or not."""
    return [((*path, key), sub) for path, value, schema in nodes(doc["spec"], SPEC, ("spec",))
            if isinstance(value, dict) for key, sub in schema.get("properties", {}).items()]


def at(doc: Any, path: Path) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def put(doc: dict[str, Any], path: Path, value: Any) -> None:
    at(doc, path[:-1])[path[-1]] = value


# --- mutations ----------------------------------------------------------------------------------

def takes(schema: Schema, value: Any) -> bool:
    """Whether `value` is of the JSON type `schema` names (numbers: any int for number)."""
    kind: str = schema.get("type", "")
    if isinstance(value, bool):
        return kind == "boolean"
    return {"string": isinstance(value, str), "integer": isinstance(value, int),
            "number": isinstance(value, (int, float)), "boolean": False, "array": isinstance(value, list),
            "object": isinstance(value, dict)}.get(kind, True)


# Including the strings a lax parser would read as a number or a bool, and 2.0 for an integer.
OTHER_TYPES = ["3", "2.5", "true", "x", 3, 2.0, 2.5, True, False, [], ["x"], {}, {"a": 1}]


@st.composite
def wrong_type(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    path, _, schema = draw(st.sampled_from(list(nodes(doc["spec"], SPEC, ("spec",)))))
    value = draw(st.sampled_from([v for v in OTHER_TYPES if not takes(schema, v)]))
    put(doc, path, copy.deepcopy(value))
    return f"wrong type at {path}"


@st.composite
def null(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    path, _, _ = draw(st.sampled_from(list(nodes(doc["spec"], SPEC, ("spec",)))))
    put(doc, path, None)
    return f"null at {path}"


def beyond(schema: Schema) -> list[Any]:
    """Values just outside the schema's bounds."""
    out: list[Any] = []
    step = [1] if schema.get("type") == "integer" else [1, 1e-6]
    if "minimum" in schema:
        out += [schema["minimum"]] if schema.get("exclusiveMinimum") else [schema["minimum"] - s for s in step]
    if "maximum" in schema:
        out += [schema["maximum"]] if schema.get("exclusiveMaximum") else [schema["maximum"] + s for s in step]
    if "maxLength" in schema:
        prefix = "s3://" if schema.get("pattern") == URI_PATTERN else ""
        filler = "1" if schema.get("pattern") == QUANTITY else "a"
        out.append(prefix + filler * (schema["maxLength"] + 1 - len(prefix)))
    if schema.get("minLength"):
        out.append("")
    if schema.get("minItems"):
        out.append([])
    return out


INT64 = 2**63


def within(schema: Schema) -> list[Any]:
    """Values on the schema's bounds, still inside: lengths counted in code points (one for 😀,
    which is two in UTF-16), the largest integer JSON carries where no maximum is set."""
    out: list[Any] = []
    if "minimum" in schema and not schema.get("exclusiveMinimum"):
        out.append(schema["minimum"])
    if "maximum" in schema and not schema.get("exclusiveMaximum"):
        out.append(schema["maximum"])
    if schema.get("type") == "integer" and "maximum" not in schema:
        out += [INT64 - 1, INT64]  # INT64 itself is beyond: the server reads it as a float
    if "maxLength" in schema and "pattern" not in schema:
        out += ["😀" * schema["maxLength"], "é" * schema["maxLength"]]
    return out


@st.composite
def on_the_bound(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    path, schema = draw(st.sampled_from([(p, s) for p, s in slots(doc) if within(s)]))
    put(doc, path, draw(st.sampled_from(within(schema))))
    return f"on the bound at {path}"


@st.composite
def out_of_range(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    candidates = [(path, schema) for path, schema in slots(doc) if beyond(schema) or "maxItems" in schema]
    path, schema = draw(st.sampled_from(candidates))
    options = beyond(schema) + (["too many"] if "maxItems" in schema else [])
    value = draw(st.sampled_from(options))
    if value == "too many":
        item = draw(allowed(schema["items"], 1))
        value = [copy.deepcopy(item) for _ in range(schema["maxItems"] + 1)]
    put(doc, path, value)
    return f"out of range at {path}"


@st.composite
def missing(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    path, _, _ = draw(st.sampled_from(list(nodes(doc["spec"], SPEC, ("spec",)))))
    parent = at(doc, path[:-1])
    del parent[path[-1]]
    return f"missing {path}"


@st.composite
def extra(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    objects = [(p, v, s) for p, v, s in nodes(doc["spec"], SPEC, ("spec",))
               if isinstance(v, dict) and "properties" in s]
    path, value, schema = draw(st.sampled_from(objects))
    known = list(schema["properties"])
    key = draw(st.sampled_from(["extra", "Name", "lora_r", *(k.lower() for k in known), *(k + "s" for k in known)]))
    if key in known:
        return "nothing (the extra field is a known one)"
    value[key] = draw(st.sampled_from([1, "x", True, {}]))
    return f"extra field {key} at {path}"


@st.composite
def unknown_enum(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    path, schema = draw(st.sampled_from([(p, s) for p, s in slots(doc) if "enum" in s]))
    put(doc, path, draw(st.sampled_from(["unknown", "", schema["enum"][0].upper(), schema["enum"][0] + " "])))
    return f"unknown enum value at {path}"


BAD_STRINGS = {
    URI_PATTERN: ["http://host/x", "hf://", "hf:/x", " hf://x", "HF://x", "hf://x\n"],
    DNS_LABEL: ["Upper", "-lead", "trail-", "a_b", "a.b", "abc\n", ""],
    QUANTITY: ["1.", "lots", "-1", "1gi", "1 Gi", "16\n"],
    r"\{label\}": ["a photo of a {lab}", "label"],
}


@st.composite
def bad_string(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    path, schema = draw(st.sampled_from([(p, s) for p, s in slots(doc) if s.get("pattern") in BAD_STRINGS]))
    put(doc, path, draw(st.sampled_from(BAD_STRINGS[schema["pattern"]])))
    return f"bad string at {path}"


@st.composite
def resample(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    """Any field, set to anything its own schema allows: breaks cross-field rules at random."""
    path, schema = draw(st.sampled_from(slots(doc)))
    put(doc, path, draw(allowed(schema)))
    return f"resampled {path}"


def _stage(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    stage: dict[str, Any] = draw(st.sampled_from(doc["spec"]["stages"]))
    return stage


# Edits aimed at the CEL rules, each often (not always) breaking one.
CROSS_FIELD: dict[str, Callable[[st.DrawFn, dict[str, Any]], None]] = {
    "another stage type": lambda draw, doc: _stage(draw, doc).update(type=draw(st.sampled_from(registry.names()))),
    "another block": lambda draw, doc: _stage(draw, doc).update(
        {draw(st.sampled_from([t.name for t in registry.with_blocks()])): {}}),
    "a duplicate stage": lambda draw, doc: doc["spec"]["stages"].append(copy.deepcopy(doc["spec"]["stages"][0])),
    "both model sources": lambda draw, doc: doc["spec"].update(
        model={"uri": "hf://org/m", "init": {"tokenizer": {"uri": "hf://org/t"}}}),
    "no model source": lambda draw, doc: doc["spec"].update(model={}),
    "a uri and a PreferenceDataset": lambda draw, doc: _stage(draw, doc)["dataset"].update(
        uri="pvc://data/x", preferenceDatasetRef={"name": "prefs"}),
    "a PreferenceDataset": lambda draw, doc: _stage(draw, doc).update(
        dataset={"preferenceDatasetRef": {"name": "prefs"}}),
    "a uri without a format": lambda draw, doc: _stage(draw, doc).update(dataset={"uri": "pvc://data/x"}),
    "a tuning method": lambda draw, doc: _stage(draw, doc).update(
        tuning={"method": draw(st.sampled_from(list(registry.TUNING_METHODS)))}),
    "a method's block": lambda draw, doc: _stage(draw, doc).update(tuning={
        "method": draw(st.sampled_from(list(registry.TUNING_METHODS))),
        draw(st.sampled_from(["lora", "ia3", "promptTuning", "prefixTuning", "adapter"])): {}}),
    "offload": lambda draw, doc: _stage(draw, doc).update(
        distributed={"deepspeed": {"zeroStage": draw(st.integers(0, 3)), "offload": "cpu"}}),
    "text settings": lambda draw, doc: _stage(draw, doc).update(hyperparameters={"maxLength": 512, "packing": True}),
    "vLLM serving": lambda draw, doc: doc["spec"].update(publish={"runtime": "vllm"}),
    "a model built from scratch": lambda draw, doc: doc["spec"].update(
        model={"init": draw(allowed(SPEC["properties"]["model"]["properties"]["init"]))}),
}


@st.composite
def cross_field(draw: st.DrawFn, doc: dict[str, Any]) -> str:
    name = draw(st.sampled_from(list(CROSS_FIELD)))
    CROSS_FIELD[name](draw, doc)
    return name


MUTATIONS = [wrong_type, null, on_the_bound, out_of_range, missing, extra, unknown_enum, bad_string, resample,
             cross_field]


def well_shaped(doc: dict[str, Any]) -> bool:
    """Whether every mutation still finds its way: a spec, a model and stages with a dataset, all objects."""
    spec = doc.get("spec")
    return (isinstance(spec, dict) and isinstance(spec.get("model"), dict) and isinstance(spec.get("stages"), list)
            and bool(spec["stages"]) and all(isinstance(s, dict) and isinstance(s.get("dataset"), dict)
                                             for s in spec["stages"]))


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[str], dict[str, Any]]:
    """A valid job, then up to two mutations (none in about one case of six)."""
    doc = draw(valid_jobs())
    done = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2]))):
        mutation = draw(st.sampled_from(MUTATIONS))
        if well_shaped(doc) and (mutation is not on_the_bound or any(within(s) for _, s in slots(doc))):
            done.append(f"{mutation.__name__}: {draw(mutation(doc))}")
    return done, doc


# --- the two judges -----------------------------------------------------------------------------

def offline(doc: dict[str, Any]) -> list[Problem]:
    """What `kubetune validate` says that the API server could also say: schema, then CEL."""
    model, problems = schema_problems("FineTuneJob", doc)
    if model is None:
        return problems
    return cel_problems("FineTuneJob", model.model_dump(mode="json", by_alias=True, exclude_none=True))


def server(api: client.ApiClient, namespace: str, doc: dict[str, Any]) -> list[tuple[str, str]] | None:
    """None when the API server accepts `doc` (a dry run); otherwise its causes, (field, message)."""
    try:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            FTJ[0], FTJ[1], namespace, FTJ[2], doc, dry_run="All", field_validation="Strict")
    except client.ApiException as e:
        if e.status not in (400, 422):
            raise
        status = json.loads(e.body or "{}")
        causes = (status.get("details") or {}).get("causes") or []
        return [(c.get("field", ""), c.get("message", "")) for c in causes] or [("", status.get("message", ""))]
    return None


# A field path in a message: `spec.stages[0].type`, or the quoted one of a strict decoding error.
FIELD_IN_MESSAGE = re.compile(r"\bspec(\.[A-Za-z]|\[|\b)")


@pytest.fixture(scope="module")
def fuzz_namespace(admin_api: client.ApiClient, operator_crds: None) -> Iterator[str]:
    # The offline validator evaluates the models' CEL rules; the API server those of crds/.
    assert not crds.check(REPO / "crds"), "crds/ differs from kubetune.api: run `kubetune crds` first"
    with fresh_namespace(admin_api, f"api-fuzz-{uuid.uuid4().hex[:5]}") as name:
        yield name


def test_kubetune_validate_and_the_api_server_accept_and_refuse_the_same_finetunejobs(
    admin_api: client.ApiClient, fuzz_namespace: str
) -> None:
    tally: Counter[str] = Counter()

    @settings(max_examples=N_CASES, deadline=None, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @seed(SEED)
    @given(case=cases())
    def agree(case: tuple[list[str], dict[str, Any]]) -> None:
        mutations, doc = case
        doc["metadata"] = {"name": f"fuzz-{uuid.uuid4().hex[:8]}"}
        problems = offline(doc)
        causes = server(admin_api, fuzz_namespace, doc)
        note(f"mutations: {mutations}\noffline: {[str(p) for p in problems]}\nserver: {causes}")
        assert (not problems) == (causes is None), (
            f"kubetune validate {'accepts' if not problems else 'refuses'} and the API server "
            f"{'accepts' if causes is None else 'refuses'}:\n{yaml.safe_dump(doc, sort_keys=False)}")
        for p in problems:
            assert p.path.startswith("spec"), f"offline refusal names no field: {p}"
        if causes is not None:  # beside those naming a field, a cause may be "<nil>: some rules were not checked"
            assert any(f.startswith("spec") or FIELD_IN_MESSAGE.search(m) for f, m in causes), (
                f"server refusal names no field: {causes}")
        tally["refused" if problems else "accepted"] += 1
        tally.update(m.split(":")[0] for m in mutations)

    agree()

    judged = ("accepted", "refused")
    print(f"\n{sum(tally[k] for k in judged)} cases (seed {SEED}): {tally['accepted']} accepted and "
          f"{tally['refused']} refused by both; mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items()) if k not in judged))
    assert tally["accepted"] >= N_CASES // 10 and tally["refused"] >= N_CASES // 2, tally
