"""The stage registry: a stage type added as one row reaches the CRD, the CEL rules,
`kubetune validate` and the trainer's dispatch, with nothing else edited.

The row is registered in a fresh interpreter (the models are built from the registry when
`kubetune.api.finetunejob` is first imported), and its recipe is a file in the test's folder
added to `kubetune_trainer.recipes`' search path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubetune.api import registry
from kubetune.api.finetunejob import FORMATS_BY_STAGE, IMPLEMENTED_STAGES, PREFERENCE_STAGES
from kubetune.api.validation import validate_object

FAKE_RECIPE = '''
"""A fake recipe: proves the trainer dispatched to it and handed it its block."""
from kubetune.api.meta import KubeModel


def run(run, ctx):
    from kubetune_registry_probe import EchoSpec
    spec = run.settings(EchoSpec)
    (ctx.out / "echo.txt").write_text(spec.greeting)
    return {"stage": run.stage, "type": run.type, "greeting": spec.greeting, "primary": run.info.primary}
'''

PROBE = '''
"""Registers the fake stage type `echoText` before anything builds the models."""
from pydantic import Field

from kubetune.api import registry
from kubetune.api.meta import KubeModel


class EchoSpec(KubeModel):
    greeting: str = Field(default="hello", max_length=64, description="What the echo stage writes.")


registry.register(registry.StageTypeInfo(
    "echoText", ("text", "promptCompletion"), "text", "causalLM", (1e-3, 1e-2), "echoes", "vllm",
    block=EchoSpec, recipe="echo_text",
))
'''

SCRIPT = '''
import json, sys
import kubetune_registry_probe  # registers echoText first
import kubetune_trainer.recipes
kubetune_trainer.recipes.__path__.append(sys.argv[1])

from kubetune.api import crds, registry
from kubetune.api.validation import validate_object
from kubetune.api.stagerun import render_stage_run
from kubetune.api.finetunejob import FineTuneJob

def job(fmt, block="echoText", stage_type="echoText"):
    stage = {"name": "echo", "type": stage_type, "dataset": {"uri": "file://data.jsonl", "format": fmt},
             "resources": {"gpusPerNode": 0}}
    stage[block] = {"greeting": "hi from the manifest"}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "echo"},
            "spec": {"model": {"uri": "file://model"}, "stages": [stage]}}

crd = crds.render()["kubetune.io_finetunejobs.yaml"]
stage_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["stages"]["items"]
out = {
    "enum": stage_schema["properties"]["type"]["enum"],
    "block": stage_schema["properties"].get("echoText"),
    "rules": [r["rule"] for r in stage_schema["x-kubernetes-validations"]],
    "valid": [str(p) for p in validate_object(job("promptCompletion"))],
    "wrongFormat": [str(p) for p in validate_object(job("preference"))],
    "blockOnSft": [str(p) for p in validate_object(job("text", stage_type="sft"))],
}
# no metrics endpoint: the default port (9310) is the same for every trainer, and another test's may hold it
run = render_stage_run(FineTuneJob.model_validate(job("text")), 0, "file://" + sys.argv[2], metrics_port=0)
(__import__("pathlib").Path(sys.argv[2]) / "stagerun.json").write_text(run.model_dump_json(by_alias=True))
from kubetune_trainer.launch import main
out["exitCode"] = main([sys.argv[2] + "/stagerun.json"])
try:
    registry.register(registry.StageTypeInfo("late", ("text",), "text", "causalLM", (1, 1), "x", "vllm"))
    out["late"] = "accepted"
except RuntimeError as e:
    out["late"] = str(e)
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("registry")
    (root / "kubetune_registry_probe.py").write_text(textwrap.dedent(PROBE))
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "echo_text.py").write_text(textwrap.dedent(FAKE_RECIPE))
    out = root / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(recipes), str(out)],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    result: dict[str, object] = json.loads(lines[-1].removeprefix("RESULT "))
    result["out"] = str(out / "echo")
    return result


def test_a_registered_stage_type_is_in_the_crd_enum_and_gets_its_block(probe: dict[str, object]) -> None:
    assert "echoText" in probe["enum"]  # type: ignore[operator]
    block = probe["block"]
    assert isinstance(block, dict) and block["properties"]["greeting"]["maxLength"] == 64


def test_the_cel_rules_carry_its_formats_and_its_block(probe: dict[str, object]) -> None:
    rules = probe["rules"]
    assert isinstance(rules, list)
    assert any("'echoText': ['text', 'promptCompletion']" in r for r in rules), rules
    assert "!has(self.echoText) || self.type == 'echoText'" in rules


def test_kubetune_validate_accepts_it_and_applies_its_rules(probe: dict[str, object]) -> None:
    assert probe["valid"] == []
    assert any("spec.stages[0]: dataset.format does not suit the stage type" in p and "echoText takes text or "
               "promptCompletion" in p for p in probe["wrongFormat"]), probe["wrongFormat"]  # type: ignore[union-attr]
    assert any("the echoText block is only for stages of type echoText" in p
               for p in probe["blockOnSft"]), probe["blockOnSft"]  # type: ignore[union-attr]


def test_the_trainer_dispatches_to_its_recipe_with_its_settings(probe: dict[str, object]) -> None:
    assert probe["exitCode"] == 0
    out = Path(str(probe["out"]))
    assert (out / "echo.txt").read_text() == "hi from the manifest"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"stage": "echo", "type": "echoText", "greeting": "hi from the manifest", "primary": "echoes"}


def test_registering_after_the_models_are_built_is_refused(probe: dict[str, object]) -> None:
    assert "register stage types before kubetune.api.finetunejob is imported" in str(probe["late"])


def test_the_tables_of_the_api_are_views_of_the_registry() -> None:
    assert FORMATS_BY_STAGE == {t.name: t.formats for t in registry.STAGE_TYPES.values()}
    assert set(PREFERENCE_STAGES) == {"reward", "dpo", "kto"}
    assert set(IMPLEMENTED_STAGES) == {t.name for t in registry.STAGE_TYPES.values() if t.implemented}
    assert registry.get("imageClassification").recipe == "image_classification"
    assert registry.get("audioPretrain").recipe == "audio_pretrain"


def _job(stage: dict[str, object], **model: object) -> dict[str, object]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
            "spec": {"model": model or {"uri": "file://m"}, "stages": [stage]}}


def test_messages_columns_may_map_the_optional_tools_field() -> None:
    stage = {"name": "s", "type": "sft", "dataset": {"uri": "file://d.jsonl", "format": "messages",
                                                    "columns": {"messages": "conversation", "tools": "functions"}}}
    assert validate_object(_job(stage)) == []
    stage["dataset"]["columns"]["images"] = "pics"  # type: ignore[index]
    assert [p.path for p in validate_object(_job(stage))] == ["spec.stages[0].dataset.columns.images"]


def test_text_only_hyperparameters_are_refused_on_other_modalities() -> None:
    stage = {"name": "s", "type": "imageClassification", "dataset": {"uri": "file://d.jsonl", "format": "imageLabel"},
             "hyperparameters": {"maxLength": 128}}
    problems = validate_object(_job(stage))
    assert any(p.path == "spec.stages[0]" and "maxLength and packing are for text stages" in p.message
               for p in problems), problems


def test_a_ppo_stage_without_a_reward_model_is_refused_naming_the_field() -> None:
    stage = {"name": "rl", "type": "ppo", "dataset": {"uri": "file://d.jsonl", "format": "promptCompletion"}}
    problems = validate_object(_job(stage))
    assert any(p.path == "spec.stages[0].ppo.rewardModelUri" for p in problems), problems


def test_grpo_batches_must_hold_whole_groups() -> None:
    stage = {"name": "rl", "type": "grpo", "dataset": {"uri": "file://d.jsonl", "format": "promptCompletion"},
             "grpo": {"numGenerations": 8}, "hyperparameters": {"batchSize": 12}, "resources": {"gpusPerNode": 0}}
    problems = validate_object(_job(stage))
    assert [p.path for p in problems] == ["spec.stages[0].hyperparameters.batchSize"], problems
    stage["hyperparameters"] = {"batchSize": 16}
    assert validate_object(_job(stage)) == []


def test_grpo_needs_a_reward_function_or_a_reward_model() -> None:
    stage = {"name": "rl", "type": "grpo", "dataset": {"uri": "file://d.jsonl", "format": "promptCompletion"},
             "grpo": {"rewardFunctions": []}}
    assert [p.path for p in validate_object(_job(stage))] == ["spec.stages[0].grpo.rewardFunctions"]
    stage["grpo"] = {"rewardFunctions": [], "rewardModelUri": "file://rm"}
    assert validate_object(_job(stage)) == []
    stage["grpo"] = {"rewardFunctions": ["format"]}
    assert any("grpo.formatPattern" in p.message for p in validate_object(_job(stage)))


def test_an_rlhf_chain_hands_the_policy_past_the_reward_model() -> None:
    """pretrain -> sft -> reward -> grpo: the reward model starts from the SFT model, GRPO starts
    from the SFT model too (not from the reward model), with the reward model as its scorer."""
    from kubetune.api.finetunejob import FineTuneJob
    from kubetune.api.stagerun import render_stage_run

    def stage(name: str, type: str, fmt: str, **extra: object) -> dict[str, object]:
        return {"name": name, "type": type, "dataset": {"uri": f"file://{name}.jsonl", "format": fmt}, **extra}

    job = FineTuneJob.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "rlhf"},
        "spec": {"model": {"uri": "hf://org/base"}, "stages": [
            stage("sft", "sft", "promptCompletion", tuning={"method": "lora"}),
            stage("rm", "reward", "preference"),
            stage("rl", "grpo", "promptCompletion", grpo={"rewardFunctions": []}),
        ]},
    })
    assert validate_object(job.to_wire() | {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"}) == []
    rm = render_stage_run(job, 1, "s3://b/out")
    rl = render_stage_run(job, 2, "s3://b/out")
    assert rm.model_uri == "s3://b/out/sft/merged"
    assert rl.model_uri == rl.reference_model_uri == "s3://b/out/sft/merged"
    assert rl.reward_model_uri == "s3://b/out/rm"
    assert rm.reward_model_uri is None and rm.reference_model_uri is None


def test_asr_after_audio_pretrain_starts_from_the_pretrained_encoder() -> None:
    """audioPretrain (model.init wav2vec2) -> asr: the CTC stage starts from the pretrained encoder,
    though its head (ctc) differs from the pretraining one (the registry row's `continues`)."""
    from kubetune.api.finetunejob import FineTuneJob
    from kubetune.api.stagerun import render_stage_run

    job = FineTuneJob.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "speech"},
        "spec": {"model": {"init": {"architecture": "wav2vec2"}}, "stages": [
            {"name": "pre", "type": "audioPretrain", "dataset": {"uri": "file://u.jsonl", "format": "audio"}},
            {"name": "ctc", "type": "asr", "dataset": {"uri": "file://t.jsonl", "format": "audioTranscript"}},
        ]},
    })
    assert validate_object(job.to_wire() | {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"}) == []
    pre, ctc = render_stage_run(job, 0, "s3://b/out"), render_stage_run(job, 1, "s3://b/out")
    assert pre.model_uri is None and pre.model_init is not None and pre.model_init.architecture == "wav2vec2"
    assert ctc.model_uri == "s3://b/out/pre" and ctc.model_init is None
