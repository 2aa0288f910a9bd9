"""What a stage folder holds, and loading it for serving.

    from kubetune_serve import loading
    stage = loading.inspect(Path("runs/demo/sft"))      # head, method, adapter or whole model, its base
    lms = loading.load_language_models({"sft": stage, "other": loading.inspect(other_dir)})

A stage folder (`<output>/<stage>/`, see kubetune_trainer.models.save_outputs) holds a whole
model, or an adapter beside a frozen base: a PEFT adapter (LoRA, IA3, prompt or prefix tuning:
`adapter_config.json`) or kubetune's bottleneck adapters (`bottleneck_config.json`), plus the
processing class and `metrics.json` with the stage's `type` and `method`. The stage type's
registry entry names the model head (`head`), so a causal LM, a reward model and an image
classifier are told apart by the table, not by guessing; a folder without metrics.json (a model
from elsewhere) is read by its config's architecture. `<stage>/merged/`, when the stage wrote
it, is served in place of base + adapter: it is the same model, without the adapter's cost.
A diffusion stage's folder is a diffusers pipeline (`model_index.json`; after LoRA, its fused
`merged/`), loaded whole with `DiffusionPipeline.from_pretrained`.

Adapters on one base share it where peft can switch between them on one copy of the base
(LoRA-family adapters of one kind, as vLLM's `--lora-modules` does); prompt- and prefix-tuning
and bottleneck adapters change how the base itself runs, so each gets its own copy.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kubetune.api import registry

log = logging.getLogger("kubetune_serve")

ADAPTER_CONFIG = "adapter_config.json"
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder (diffusion stages)
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
# A folder without metrics.json: its config's architecture names the head.
ARCHITECTURE_HEADS = (
    ("ForCausalLM", "causalLM"), ("LMHeadModel", "causalLM"),
    ("ForSequenceClassification", "reward"), ("ForImageClassification", "imageClassification"),
    ("CLIPModel", "contrastiveImageText"), ("ForCTC", "ctc"), ("WhisperForConditionalGeneration", "speechSeq2Seq"),
)
SPEECH_HEADS = ("ctc", "speechSeq2Seq")  # served through transformers' ASR pipeline
PEFT_TASK_HEADS = {"CAUSAL_LM": "causalLM", "SEQ_CLS": "reward"}


@dataclass(frozen=True)
class Stage:
    """One servable folder: what it is and where its weights are."""

    path: Path  # the folder loaded (the stage folder, or its merged/ subfolder)
    head: str  # a registry Head: causalLM, reward, imageClassification, ...
    stage_type: str | None  # metrics.json `type`, when the folder has one
    method: str  # tuning method: full, lora, ia3, promptTuning, prefixTuning, adapter
    base: Path | None = None  # the base model, for an adapter
    peft_type: str | None = None  # LORA, IA3, PROMPT_TUNING, PREFIX_TUNING (peft adapters only)

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def shares_base(self) -> bool:
        """peft can switch this adapter on and off on a base other adapters use."""
        return self.peft_type in ("LORA", "IA3")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _local(uri: str | None) -> Path | None:
    if not uri:
        return None
    from kubetune_trainer import storage

    path = storage.local_path(uri)
    return path if path.exists() else None


def inspect(path: Path, base: Path | None = None) -> Stage:
    """What the folder `path` holds. `base`: where its base model is, for an adapter (default: the
    base the adapter records, else the stage's StageRun `modelUri`)."""
    from kubetune_trainer import bottleneck

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is no folder; give a stage output folder (<output>/<stage>)")
    metrics = _read_json(path / "metrics.json")
    stage_type = metrics.get("type")
    method = str(metrics.get("method") or "full")
    head: str | None = registry.get(stage_type).head if stage_type else None
    speech = head in SPEECH_HEADS
    if speech:  # an asr stage trains CTC or Whisper models: the config tells which
        head = None
    for folder in (path / "merged", path):  # a diffusers pipeline (diffusion stages): the fused one first
        if (folder / PIPELINE_INDEX).exists():
            return Stage(folder, "diffusionUNet", stage_type, method)
    if (path / DIFFUSERS_LORA).exists():
        raise ValueError(f"{path} holds a diffusers LoRA adapter without its fused pipeline; serve a stage that "
                         "wrote merged/ (spec.output.merge: true, or publish the job, which merges it)")
    if (path / "merged" / "config.json").exists():
        return Stage(path / "merged", head or _head_of_config(path / "merged"), stage_type, method)
    adapter = _read_json(path / ADAPTER_CONFIG)
    bottleneck_config = _read_json(path / bottleneck.CONFIG_FILE) if bottleneck.is_adapter(path) else {}
    if not adapter and not bottleneck_config:
        if not (path / "config.json").exists():
            raise ValueError(f"{path} holds neither a model (config.json) nor an adapter ({ADAPTER_CONFIG}, "
                             f"{bottleneck.CONFIG_FILE}); give a stage output folder")
        return Stage(path, head or _head_of_config(path), stage_type, method)
    if speech:
        raise ValueError(f"{path} holds a speech model's adapter without merged weights; serve a stage that wrote "
                         "merged/ (spec.output.merge: true, or publish the job, which merges it)")
    recorded = adapter.get("base_model_name_or_path") or bottleneck_config.get("base_model_name_or_path")
    stagerun = _read_json(path / "stagerun.json") or _read_json(path.parent / f"{path.name}.stagerun.json")
    found = base or _local(recorded) or _local(stagerun.get("modelUri"))
    if found is None:
        raise ValueError(f"the adapter at {path} was trained on {recorded or 'a base model'}, which is not here; "
                         "give the base model's folder (--base)")
    if head is None:
        head = PEFT_TASK_HEADS.get(str(adapter.get("task_type")), "causalLM")
    if not adapter:
        method = "adapter"
    return Stage(path, head, stage_type, method, base=found, peft_type=adapter.get("peft_type"))


def _head_of_config(path: Path) -> str:
    config = _read_json(path / "config.json")
    for arch in config.get("architectures") or []:
        for suffix, head in ARCHITECTURE_HEADS:
            if str(arch).endswith(suffix):
                return head
    raise ValueError(f"{path} has no metrics.json and its config.json names no architecture kubetune-serve knows "
                     f"({', '.join(s for s, _ in ARCHITECTURE_HEADS)})")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype() -> torch.dtype:
    """bf16 (or fp16) on GPUs, fp32 on CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _auto(head: str) -> Any:
    from kubetune_trainer import models

    try:
        return models.HEADS[head]
    except KeyError:
        raise ValueError(f"kubetune-serve cannot load a {head} model yet") from None


def load_base(stage: Stage, path: Path | None = None) -> Any:
    """The model at `path` (default: the stage's own folder, or its base for an adapter) with the stage's head."""
    spec = _auto(stage.head)
    source = path or stage.base or stage.path
    model = spec.cls().from_pretrained(str(source), dtype=dtype(), **dict(spec.kwargs))
    return model


def processing_class(stage: Stage) -> Any:
    """The tokenizer or image processor saved with the stage (an adapter's is beside it)."""
    if stage.head == "imageClassification":
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(stage.path))
    if stage.head == "contrastiveImageText":  # CLIP: its CLIPProcessor (image processor and tokenizer)
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(stage.path))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(stage.path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(stage: Stage) -> Any:
    """The stage's model, ready to run: a whole model, or its base with the adapter on."""
    from kubetune_trainer import bottleneck, models

    model = load_base(stage)
    if stage.is_adapter:
        if stage.head != "imageClassification":
            models.fit_embeddings(model, processing_class(stage))
        if stage.peft_type is None:
            model = bottleneck.load(model, stage.path)
        else:
            from peft import PeftModel

            model = models.generation_ready(PeftModel.from_pretrained(model, str(stage.path)))
    if getattr(model.config, "pad_token_id", 0) is None and stage.head == "reward":
        model.config.pad_token_id = processing_class(stage).pad_token_id
    return model.to(device()).eval()


def load_pipeline(stage: Stage) -> Any:
    """A diffusers pipeline folder (what a diffusion stage writes), on the serving device."""
    from diffusers import DiffusionPipeline

    from kubetune_trainer.recipes.diffusion import quiet

    with quiet():
        pipe = DiffusionPipeline.from_pretrained(str(stage.path), dtype=dtype())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device())


def load_speech_pipeline(stage: Stage) -> Any:
    """transformers' automatic-speech-recognition pipeline on a whole CTC or Whisper model folder (with its
    processor; a LoRA stage's `merged/`)."""
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=str(stage.path), dtype=dtype(), device=device())


@dataclass
class Served:
    """One served name's model: `model` runs it after `activate()`; `lock` guards a shared base."""

    name: str
    stage: Stage
    model: Any
    processing_class: Any
    adapter_name: str | None = None  # the peft adapter to switch to on a shared base
    lock: threading.Lock = field(default_factory=threading.Lock)

    def activate(self) -> None:
        """Switch a shared base to this adapter (call with `lock` held)."""
        if self.adapter_name is not None:
            self.model.set_adapter(self.adapter_name)


def load_language_models(stages: dict[str, Stage]) -> dict[str, Served]:
    """Every named stage loaded, LoRA-family adapters of one kind on one base sharing one copy of it."""
    from kubetune_trainer import models

    served: dict[str, Served] = {}
    shared: dict[tuple[Path, str], Served] = {}
    for name, stage in stages.items():
        if stage.head == "diffusionUNet":
            served[name] = Served(name, stage, load_pipeline(stage), None)
            log.info("Loaded pipeline name=%s path=%s class=%s", name, stage.path, type(served[name].model).__name__)
            continue
        if stage.head in SPEECH_HEADS:
            served[name] = Served(name, stage, load_speech_pipeline(stage), None)
            log.info("Loaded speech recognizer name=%s path=%s head=%s", name, stage.path, stage.head)
            continue
        tokenizer = processing_class(stage)
        key = (stage.base.resolve(), stage.peft_type or "") if stage.base is not None else None
        if key is not None and stage.shares_base and key in shared:
            first = shared[key]
            if len(tokenizer) != len(first.processing_class):
                raise ValueError(f"adapters {first.name} and {name} have different vocabularies "
                                 "and cannot share one base")
            first.model.load_adapter(str(stage.path), adapter_name=name)
            served[name] = Served(name, stage, first.model, tokenizer, adapter_name=name, lock=first.lock)
            log.info("Loaded adapter name=%s path=%s base=%s shared=true", name, stage.path, stage.base)
            continue
        if key is not None and stage.shares_base:
            from peft import PeftModel

            base = load_base(stage)
            models.fit_embeddings(base, tokenizer)
            model = PeftModel.from_pretrained(base, str(stage.path), adapter_name=name).to(device()).eval()
            entry = Served(name, stage, model, tokenizer, adapter_name=name)
            shared[key] = entry
        else:
            entry = Served(name, stage, load(stage), tokenizer)
        served[name] = entry
        log.info("Loaded model name=%s path=%s head=%s method=%s", name, stage.path, stage.head, stage.method)
    return served
