"""Models and their processing classes: load or initialise them, quantize, wrap in PEFT, save them.

    from kubetune_trainer import models
    tokenizer = models.load_tokenizer(run, texts)       # or train one for model.init
    model = models.load_model(run, tokenizer)            # the head of the stage type's registry entry
    model = models.add_adapters(model, run)              # bottleneck adapters (tuning.method adapter)
    peft_config = models.peft_config(run)                # LoRA, IA3, prompt or prefix tuning; else None

The model class comes from the stage type's registry entry (`head`), looked up in `HEADS`:
a new head is one row there, not a branch in every function. The processing class is what
transformers calls it: a tokenizer for text, an image processor, a feature extractor or a
processor; whatever it is, it is saved beside the model (`save_pretrained`).

What a stage writes (`save_outputs`): the trained model or adapter in safetensors at the stage
folder (a PEFT adapter folder, or `bottleneck.py`'s for adapters), the tokenizer always, and for
stages with `merge` (LoRA, QLoRA, IA3: the methods whose update folds into the weights) the merged
weights plus the tokenizer at `<output>/merged/`, which is what the next stage loads (see
`kubetune.api.stagerun.stage_model_uri`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubetune.api import StageRun
from kubetune.api.finetunejob import AdapterSpec, Ia3Spec, LoraSpec, ModelInit, PrefixTuningSpec, PromptTuningSpec

from kubetune_trainer import bottleneck, storage

log = logging.getLogger("kubetune_trainer")

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# kubetune's default chat template: ChatML (as Qwen and many others use it), without a default
# system prompt. Assistant turns sit inside {% generation %} markers, so TRL's
# assistant_only_loss can mask everything else; the end-of-turn token is inside the marker so
# the model learns to stop. Tool calls are rendered as <tool_call>{json}</tool_call> and tool
# results as a `tool` turn.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '<tool_call>{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# --- precision and devices ----------------------------------------------------------------


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype mixed precision computes in: bf16 on GPUs that have it (auto), fp32 on CPU."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "fp32" or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --- tokenizers ---------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, with kubetune's special tokens and ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def load_tokenizer(run: StageRun, texts: Iterable[str] | None = None) -> Any:
    """The stage's tokenizer: the input model's, the one model.init names, or one trained on `texts`."""
    from transformers import AutoTokenizer

    init = run.model_init
    tok = init.tokenizer if init is not None else None
    if run.model_uri is not None:
        path = storage.local_path(run.model_uri)
    elif tok is not None and tok.uri is not None:
        path = storage.local_path(tok.uri)
    elif tok is not None and tok.train is not None:
        if texts is None:
            raise ValueError("model.init.tokenizer.train needs text data to train on; use a pretrain stage first")
        t = tok.train
        return train_tokenizer(texts, t.vocab_size, t.min_frequency)
    else:
        raise ValueError("the StageRun has neither modelUri nor modelInit.tokenizer; set spec.model.uri, "
                         "or spec.model.init with a tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=run.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensure_chat_template(tokenizer: Any, template: str | None) -> list[str]:
    """Give the tokenizer a chat template: `template`, else its own, else kubetune's ChatML.

    Returns the special tokens that had to be added (ChatML markers a base model lacks); the
    caller resizes the embeddings for them.
    """
    if template is not None:
        tokenizer.chat_template = template
        return []
    if tokenizer.chat_template:
        return []
    tokenizer.chat_template = CHATML_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        log.warning("Added ChatML tokens to the tokenizer tokens=%s; their embeddings start untrained", missing)
    return missing


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated answer: eos, plus ChatML's <|im_end|> when the tokenizer has it."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.get_vocab().get(IM_END)
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    return [i for i in ids if i is not None]


def stop_at_end_of_turn(folder: Path, tokenizer: Any) -> None:
    """Make the generation config saved in `folder` end an answer at every end_of_turn_ids token, not at eos
    alone: servers that read it (vLLM; transformers' generate) stop a chat reply at <|im_end|>, as the
    trainer's evaluation and kubetune-serve do. Only for a ChatML tokenizer and a folder with a config."""
    path = folder / "generation_config.json"
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if not path.exists() or IM_END not in vocab:
        return
    config = json.loads(path.read_text())
    config["eos_token_id"] = end_of_turn_ids(tokenizer)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """How to load the model of one registry head: its transformers Auto class and extra kwargs."""

    auto_class: str  # a class name in transformers
    kwargs: tuple[tuple[str, Any], ...] = ()
    task_type: str | None = None  # peft's task type for LoRA on this head

    def cls(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)


# The heads the trainer loads today; the vision and speech stages add theirs.
HEADS: dict[str, HeadSpec] = {
    "causalLM": HeadSpec("AutoModelForCausalLM", task_type="CAUSAL_LM"),
    "reward": HeadSpec("AutoModelForSequenceClassification", (("num_labels", 1),), task_type="SEQ_CLS"),
    # the number of labels and their names come from the data (recipes/image_classification.py)
    "imageClassification": HeadSpec("AutoModelForImageClassification"),
    "contrastiveImageText": HeadSpec("CLIPModel"),  # a vision and a text tower (recipes/clip.py)
}


def head_of(run: StageRun, head: str | None = None) -> HeadSpec:
    """The HeadSpec of `head`, default: the stage type's registry head."""
    name = head or run.info.head
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(f"the trainer cannot load a {name} model yet (stage type {run.type})") from None


def init_config(init: ModelInit, tokenizer: Any) -> Any:
    """A transformers config for a model built from scratch."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    vocab = len(tokenizer)
    # Gated MLPs (llama, qwen2) have three matrices, so 8/3 x keeps the parameter count of a 4 x MLP;
    # rounded up to a multiple of 32, which bitsandbytes' CPU 4-bit kernels (qlora) require.
    gated_width = int(math.ceil(init.hidden_size * 8 / 3 / 32) * 32)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id}
    if init.architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=init.max_position_embeddings, n_embd=init.hidden_size,
            n_layer=init.num_layers, n_head=init.num_heads,
            n_inner=init.intermediate_size or 4 * init.hidden_size, **ids,
        )
    cls = LlamaConfig if init.architecture == "llama" else Qwen2Config
    return cls(
        vocab_size=vocab,
        hidden_size=init.hidden_size,
        num_hidden_layers=init.num_layers,
        num_attention_heads=init.num_heads,
        num_key_value_heads=init.num_key_value_heads or init.num_heads,
        intermediate_size=init.intermediate_size or gated_width,
        max_position_embeddings=init.max_position_embeddings,
        **ids,
    )


def vision_config(init: ModelInit, labels: list[str]) -> Any:
    """A transformers config for an image classifier built from scratch, with a head for `labels`.

    vit: numLayers blocks of width hiddenSize on imageSize/patchSize patches per side; convnext
    and resnet ("basic" blocks, as ResNet-18): numLayers stages of 2 blocks, hiddenSize x 2^i wide.
    """
    from transformers import ConvNextConfig, ResNetConfig, ViTConfig

    from kubetune.api.finetunejob import DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE

    ids: dict[str, Any] = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
           "label2id": {name: i for i, name in enumerate(labels)}}
    image_size = init.image_size or DEFAULT_IMAGE_SIZE
    widths = [init.hidden_size * 2 ** i for i in range(init.num_layers)]
    if init.architecture == "vit":
        return ViTConfig(
            image_size=image_size, patch_size=init.patch_size or DEFAULT_PATCH_SIZE["vit"],
            hidden_size=init.hidden_size, num_hidden_layers=init.num_layers, num_attention_heads=init.num_heads,
            intermediate_size=init.intermediate_size or 4 * init.hidden_size, **ids,
        )
    if init.architecture == "convnext":
        return ConvNextConfig(
            image_size=image_size, patch_size=init.patch_size or DEFAULT_PATCH_SIZE["convnext"],
            num_stages=init.num_layers, hidden_sizes=widths, depths=[2] * init.num_layers, **ids,
        )
    if init.architecture == "resnet":
        return ResNetConfig(
            embedding_size=init.hidden_size, hidden_sizes=widths, depths=[2] * init.num_layers, layer_type="basic",
            **ids,
        )
    raise ValueError(f"model.init.architecture {init.architecture} is no vision architecture; use vit, convnext or resnet")


def image_processor(init: ModelInit) -> Any:
    """The image processor of a vision model built from scratch: resize to imageSize, scale, normalise
    with ImageNet's mean and deviation (the processors transformers pairs with each architecture)."""
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    from kubetune.api.finetunejob import DEFAULT_IMAGE_SIZE

    side = init.image_size or DEFAULT_IMAGE_SIZE
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if init.architecture == "vit":
        return ViTImageProcessor(size={"height": side, "width": side}, image_mean=mean, image_std=std)
    # crop_pct 1: resize the shorter side to imageSize and keep the whole image
    return ConvNextImageProcessor(size={"shortest_edge": side}, crop_pct=1.0, image_mean=mean, image_std=std)


def quantization_config(run: StageRun) -> Any:
    """bitsandbytes nf4 4-bit with double quantization for qlora; None otherwise."""
    if run.tuning.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(run.hyperparameters.precision),
    )


def check_tuning(run: StageRun) -> None:
    """Refuse combinations that cannot work, with the fix in the message."""
    if run.tuning.method != "full" and run.model_uri is None:
        raise ValueError(
            f"tuning.method {run.tuning.method} adapts an existing model, but stage {run.stage} builds one from "
            "scratch (model.init); use tuning.method full for it, or start from spec.model.uri"
        )
    if run.tuning.method == "qlora" and not torch.cuda.is_available():
        log.warning("Using qlora on CPU: bitsandbytes runs 4-bit on CPU, but slowly; use lora or a GPU")


def base_dtype(run: StageRun) -> torch.dtype:
    """Weights dtype on load: fp32 master weights for full training; the compute dtype under frozen LoRA bases."""
    if run.tuning.method == "full":
        return torch.float32
    return compute_dtype(run.hyperparameters.precision)


def init_of(run: StageRun) -> ModelInit:
    """run.modelInit, for a stage that builds its model because it has no modelUri."""
    if run.model_init is None:
        raise ValueError("the StageRun has neither modelUri nor modelInit; set spec.model.uri or spec.model.init")
    return run.model_init


@dataclass(frozen=True)
class FastPath:
    """The speed-ups a stage uses (hyperparameters.fastPath), each only where it computes what the
    plain path does: where the node has it, and its package is installed."""

    fused_adamw: bool  # torch's fused AdamW (transformers' default on torch >= 2.8; off: the loop over tensors)
    liger: bool  # on CUDA: Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy kernels (liger-kernel)
    flash_attention: bool  # on CUDA, bf16/fp16, text models: FlashAttention-2 (flash-attn)
    packing: bool  # SFT packs examples padding-free by default (each keeps its positions): exact with flash attention

    def as_dict(self) -> dict[str, bool]:
        return {"fusedAdamW": self.fused_adamw, "liger": self.liger, "flashAttention": self.flash_attention,
                "packing": self.packing}


def installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def fast_path(run: StageRun) -> FastPath:
    """What hyperparameters.fastPath turns on for this stage on this node."""
    hp = run.hyperparameters
    cuda_text = hp.fast_path and torch.cuda.is_available() and run.info.modality == "text"
    flash = (cuda_text and compute_dtype(hp.precision) in (torch.bfloat16, torch.float16)
             and installed("flash_attn"))
    return FastPath(fused_adamw=hp.fast_path, liger=cuda_text and installed("liger_kernel"),
                    flash_attention=flash, packing=flash and run.type == "sft")


def load_model(run: StageRun, processing_class: Any, head: str | None = None, uri: str | None = None) -> Any:
    """The model a stage trains: from `uri` (default: run.modelUri) or built from run.modelInit.

    head: a registry head (default: the stage type's), e.g. "reward" for a value model in PPO.
    """
    spec = head_of(run, head)
    cls, extra = spec.cls(), dict(spec.kwargs)
    uri = uri or run.model_uri
    if fast_path(run).flash_attention:
        extra["attn_implementation"] = "flash_attention_2"
    if uri is None:
        init = init_of(run)
        config = init_config(init, processing_class)
        attention = extra.pop("attn_implementation", None)
        for k, v in extra.items():
            setattr(config, k, v)
        model = cls.from_config(config, **({"attn_implementation": attention} if attention else {}))
        log.info("Initialised model architecture=%s parameters=%d", init.architecture, count_parameters(model))
        return model
    path = str(storage.local_path(uri))
    kwargs: dict[str, Any] = {"dtype": base_dtype(run), "trust_remote_code": run.trust_remote_code, **extra}
    q = quantization_config(run)
    if q is not None:
        kwargs["quantization_config"] = q
        if torch.cuda.is_available():
            import os

            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = cls.from_pretrained(path, **kwargs)
    _adopt_pad_token(model, processing_class)
    log.info("Loaded model uri=%s head=%s parameters=%d dtype=%s", uri, head or run.info.head,
             count_parameters(model), kwargs["dtype"])
    return model


def _adopt_pad_token(model: Any, processing_class: Any) -> None:
    """Give a model without a pad token its tokenizer's (sequence classifiers find the last token by it)."""
    pad = getattr(processing_class, "pad_token_id", None)
    if getattr(model.config, "pad_token_id", 0) is None and pad is not None:
        model.config.pad_token_id = pad


def load_scorer(run: StageRun, uri: str) -> tuple[Any, Any]:
    """A frozen reward model and its tokenizer (full precision, eval mode) to score samples with."""
    from transformers import AutoTokenizer

    path = str(storage.local_path(uri))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=run.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = HEADS["reward"]
    model = spec.cls().from_pretrained(path, dtype=torch.float32, trust_remote_code=run.trust_remote_code,
                                       **dict(spec.kwargs))
    _adopt_pad_token(model, tokenizer)
    model.requires_grad_(False).eval()
    log.info("Loaded reward model uri=%s parameters=%d", uri, count_parameters(model))
    return model, tokenizer


def fit_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings when the tokenizer gained tokens (new rows start at the mean embedding)."""
    if hasattr(tokenizer, "__len__") and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def prepare_for_kbit(model: Any, run: StageRun) -> Any:
    """peft's preparation of a 4-bit base (fp32 norms, input gradients) for qlora; a no-op otherwise."""
    if run.tuning.method != "qlora":
        return model
    from peft import prepare_model_for_kbit_training

    for module in model.modules():  # bitsandbytes repacks 4-bit weights for CPU inference in eval mode,
        if hasattr(module, "support_avx512bf16_for_cpu"):  # which breaks training after an evaluation
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=run.hyperparameters.gradient_checkpointing
    )


def peft_config(run: StageRun, task_type: str | None = None, trainable_tokens: dict[str, list[int]] | None = None) -> Any:
    """The peft config of tuning.method (LoRA, IA3, prompt or prefix tuning); None for full fine-tuning
    and for bottleneck adapters, which `add_adapters` puts on the model itself.

    trainable_tokens: {embedding module name: token ids} whose embedding rows train although
    the base is frozen (tokens the stage added for its chat template; LoRA only).
    """
    method, tuning = run.tuning.method, run.tuning
    task_type = task_type or head_of(run).task_type
    if method in ("full", "adapter") or run.adapter_uri:  # adapter_uri: add_adapters loads the one to continue
        return None
    if method == "ia3":
        from peft import IA3Config

        ia3 = tuning.ia3 or Ia3Spec()
        return IA3Config(task_type=task_type, target_modules=ia3.target_modules,
                         feedforward_modules=ia3.feedforward_modules)
    if method == "promptTuning":
        from peft import PromptTuningConfig, PromptTuningInit

        prompt = tuning.prompt_tuning or PromptTuningSpec()
        text = prompt.init_text is not None
        return PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=prompt.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.SAMPLE_VOCAB,
            prompt_tuning_init_text=prompt.init_text,
            tokenizer_name_or_path=str(storage.local_path(run.model_uri)) if text and run.model_uri else None,
        )
    if method == "prefixTuning":
        from peft import PrefixTuningConfig

        prefix = tuning.prefix_tuning or PrefixTuningSpec()
        extra: dict[str, Any] = {}
        if prefix.projection_hidden_size is not None:
            extra["encoder_hidden_size"] = prefix.projection_hidden_size
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=prefix.num_virtual_tokens,
                                  prefix_projection=prefix.projection, **extra)
    from peft import LoraConfig

    spec = tuning.lora or LoraSpec()
    targets: str | list[str] = "all-linear" if spec.target_modules == ["all-linear"] else list(spec.target_modules)
    tokens: dict[str, Any] = {"trainable_token_indices": trainable_tokens} if trainable_tokens else {}
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        use_dora=spec.use_dora,
        task_type=task_type,
        **tokens,
    )


def add_adapters(model: Any, run: StageRun) -> Any:
    """Bottleneck adapters on a frozen `model` for tuning.method adapter, or the previous stage's adapter
    to keep training (run.adapter_uri: a method whose adapter cannot be merged); the model unchanged otherwise."""
    if run.adapter_uri:
        path = storage.local_path(run.adapter_uri)
        log.info("Continuing adapter uri=%s method=%s", run.adapter_uri, run.tuning.method)
        if bottleneck.is_adapter(path):
            return bottleneck.load(model, path)  # the base frozen, the adapters trainable
        # peft loads prompt-learning adapters for inference only: rebuild this one and put its weights in
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        config = PeftConfig.from_pretrained(str(path))
        config.inference_mode = False
        model = get_peft_model(model, config)
        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return generation_ready(model)
    if run.tuning.method != "adapter":
        return model
    return bottleneck.add(model, run.tuning.adapter or AdapterSpec(), run.model_uri)


def new_token_rows(model: Any, tokenizer: Any, tokens: list[str]) -> dict[str, list[int]] | None:
    """{input embedding module name: ids} of tokens added to the tokenizer, for peft_config."""
    if not tokens:
        return None
    embeddings = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embeddings).split(".")[-1]
    return {name: tokenizer.convert_tokens_to_ids(tokens)}


def count_parameters(model: Any, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# --- saving -------------------------------------------------------------------------------


# (path, dtype) -> the base model under a stage's adapter. By default the registry head's class loads it
# (`load_base`); a recipe whose base needs more passes its own (image classification: a head for the data's labels).
BaseLoader = Callable[[str, Any], Any]


def load_base(run: StageRun, path: str, dtype: Any, head: str | None = None) -> Any:
    """The model at `path` in `dtype` (a torch dtype or "auto"), as registry head `head` (default: the stage
    type's) loads it."""
    spec = head_of(run, head)
    return spec.cls().from_pretrained(path, dtype=dtype, trust_remote_code=run.trust_remote_code, **dict(spec.kwargs))


def merge_adapter(run: StageRun, out: Path, processing_class: Any, base_loader: BaseLoader | None = None) -> Path:
    """Fold the LoRA or IA3 adapter saved at `out` into a full-precision copy of its base; write `<out>/merged`.

    The base is reloaded unquantized (qlora included): merging into 4-bit weights would lose the update.
    base_loader: how to load the base (default: `load_base`).
    """
    from peft import PeftModel

    assert run.model_uri is not None
    path = str(storage.local_path(run.model_uri))
    base = base_loader(path, "auto") if base_loader else load_base(run, path, "auto")
    _adopt_pad_token(base, processing_class)
    fit_embeddings(base, processing_class)
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    target = out / "merged"
    merged.save_pretrained(str(target))
    processing_class.save_pretrained(str(target))
    stop_at_end_of_turn(target, processing_class)
    log.info("Wrote merged model path=%s", target)
    return target


def load_trained(run: StageRun, out: Path, base_loader: BaseLoader | None = None, head: str | None = None) -> Any:
    """Reload what a stage wrote (model, or base + adapter) for evaluation on one process.

    base_loader: how to load the base under an adapter (default: `load_base`); head: the registry head
    the stage trained (default: its stage type's).
    """
    spec = head_of(run, head)
    cls = spec.cls()
    kwargs: dict[str, Any] = {"trust_remote_code": run.trust_remote_code, **dict(spec.kwargs)}
    if run.tuning.method == "full":
        return cls.from_pretrained(str(out), dtype=torch.float32, **kwargs)
    if (out / "merged").exists():
        return cls.from_pretrained(str(out / "merged"), dtype=torch.float32, **kwargs)
    from peft import PeftModel

    from transformers import AutoTokenizer

    assert run.model_uri is not None
    path = str(storage.local_path(run.model_uri))
    base = base_loader(path, torch.float32) if base_loader else load_base(run, path, torch.float32)
    if run.info.modality == "text":
        fit_embeddings(base, AutoTokenizer.from_pretrained(str(out)))
    if bottleneck.is_adapter(out):
        return bottleneck.load(base, out)
    return generation_ready(PeftModel.from_pretrained(base, str(out)))


def generation_ready(model: Any) -> Any:
    """A prompt- or prefix-tuned PeftModel whose `generate` keeps its virtual tokens.

    peft 0.21 reads and writes the generation cache under `past_key_values`, while transformers 5
    passes it as `cache`; without this, generate drops the prefix (prefix tuning) or re-inserts
    the prompt at every step (prompt tuning). Here the base model's generation inputs carry the
    cache under the older name, which transformers still accepts.
    """
    if not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return model
    prepare = model.base_model_prepare_inputs_for_generation

    def renamed(*args: Any, **kwargs: Any) -> Any:
        out = prepare(*args, **kwargs)
        if "cache" in out:
            out["past_key_values"] = out.pop("cache")
        return out

    model.base_model_prepare_inputs_for_generation = renamed
    return model


# --- speech (the audioPretrain and asr stages) ----------------------------------------------

HEADS.update({
    "speechPretraining": HeadSpec("Wav2Vec2ForPreTraining"),  # recipes/audio_pretrain.py
    "ctc": HeadSpec("AutoModelForCTC"),  # wav2vec 2.0 with a character head (recipes/asr.py)
    "speechSeq2Seq": HeadSpec("AutoModelForSpeechSeq2Seq"),  # Whisper (recipes/asr.py)
})


def wav2vec2_config(init: ModelInit, **extra: Any) -> Any:
    """A wav2vec 2.0 config built from scratch at model.init's sizes: a feature encoder of 7 convolutions
    (the first 4 half hiddenSize wide, where the frames are many; strides 5, 2, 2, 2, 2, 2, 2: one frame
    per 20 ms of 16 kHz audio, as the paper's), numLayers transformer blocks of width hiddenSize, a
    product quantizer of 2 groups of 64 codevectors; `extra` overrides."""
    from transformers import Wav2Vec2Config

    width = init.hidden_size
    groups = 4 if width % 4 == 0 else 1
    settings: dict[str, Any] = dict(
        hidden_size=width, num_hidden_layers=init.num_layers, num_attention_heads=init.num_heads,
        intermediate_size=init.intermediate_size or 4 * width,
        conv_dim=(max(width // 2, 16),) * 4 + (width,) * 3, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        feat_extract_norm="group", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=groups,
        num_codevector_groups=2, num_codevectors_per_group=64, codevector_dim=width, proj_codevector_dim=width,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0,
    )
    settings.update(extra)
    return Wav2Vec2Config(**settings)


def speech_feature_extractor() -> Any:
    """The feature extractor of a wav2vec 2.0 model built from scratch: 16 kHz samples, each clip
    normalised to zero mean and unit variance, with an attention mask over the padding."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)


WHISPER_WINDOW = 30  # seconds: Whisper's own window
WHISPER_MELS = 80


def whisper_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, language: str, task: str) -> Any:
    """A Whisper tokenizer trained on `texts`: byte-level BPE (each text read with a leading space, as Whisper
    writes words), <|endoftext|> first, then Whisper's special tokens in Whisper's order, <|startoftranscript|>
    directly followed by every language token (WhisperTokenizer finds a language's token by that order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((" " + t for t in texts), trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    tokenizer = WhisperTokenizer(vocab=bpe["vocab"], merges=merges, pad_token=EOS)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), "<|translate|>", "<|transcribe|>",
        "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]})
    tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
    return tokenizer


def whisper_feature_extractor(window: int = WHISPER_WINDOW) -> Any:
    """Whisper's log-Mel features (80 bins, 25 ms windows every 10 ms) of clips padded to `window` seconds."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=WHISPER_MELS, sampling_rate=16000, hop_length=160, n_fft=400,
                                   chunk_length=window)


def whisper_config(init: ModelInit, tokenizer: Any, **extra: Any) -> Any:
    """A Whisper config built from scratch at model.init's sizes: numLayers encoder and decoder blocks of
    width hiddenSize; the encoder's positions cover windowSeconds (two convolutions, the second of stride 2:
    50 positions a second), the decoder's maxPositionEmbeddings tokens; `extra` overrides."""
    from transformers import WhisperConfig

    width, window = init.hidden_size, init.window_seconds or WHISPER_WINDOW
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer), num_mel_bins=WHISPER_MELS, d_model=width,
        encoder_layers=init.num_layers, decoder_layers=init.num_layers,
        encoder_attention_heads=init.num_heads, decoder_attention_heads=init.num_heads,
        encoder_ffn_dim=init.intermediate_size or 4 * width, decoder_ffn_dim=init.intermediate_size or 4 * width,
        max_source_positions=window * 50, max_target_positions=init.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        begin_suppress_tokens=None, suppress_tokens=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    settings.update(extra)
    return WhisperConfig(**settings)


def whisper_generation_config(config: Any, tokenizer: Any, language: str, task: str) -> Any:
    """What WhisperForConditionalGeneration.generate needs to write the language and task tokens itself
    (generate(features, language="en", task="transcribe"), and transformers' ASR pipeline): the ids of
    every language and task token and of <|notimestamps|>, and `language` and `task` as the defaults."""
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = tokenizer.convert_tokens_to_ids
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_length=config.max_target_positions,
        is_multilingual=True, lang_to_id={f"<|{c}|>": ids(f"<|{c}|>") for c in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), language=language, task=task,
    )
