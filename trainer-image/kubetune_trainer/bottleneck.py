"""Bottleneck adapters (Houlsby et al. 2019): `tuning.method: adapter`.

A small module, down-projection -> non-linearity -> up-projection plus a residual, after the
attention output and the feed-forward output of every layer (placement `houlsby`), or after the
feed-forward output only (`pfeiffer`, Pfeiffer et al. 2021). The base stays frozen; only the
adapters train. The up-projection starts at zero, so a fresh adapter is the identity and the
model answers exactly as before training.

Written here because neither library that has them fits: PEFT (0.21) has no bottleneck
adapters, and AdapterHub's `adapters` package pins transformers 4.57 while the project runs on
transformers 5. The adapters hang on the base model through forward hooks, so the base's
weight names are unchanged (checkpoints resume as usual) and the adapter weights live under
one `kubetune_adapters` module.

Output: `bottleneck_config.json` (placement, sizes, the adapted modules, the base model) and
`bottleneck_adapter.safetensors` in the stage folder; `load` puts them back on a base model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("kubetune.trainer")

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
ROOT = "kubetune_adapters"

# Module-name endings of the attention output and feed-forward output projections, per family:
# llama/qwen2/mistral, gpt2, BERT/ViT, CLIP/Whisper/wav2vec 2.0.
ATTENTION_OUTPUTS = ("self_attn.o_proj", "attn.c_proj", "attention.output.dense", "self_attn.out_proj",
                     "attention.out_proj")
FEED_FORWARD_OUTPUTS = ("mlp.down_proj", "mlp.c_proj", "output.dense", "fc2", "feed_forward.output_dense")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """x + up(act(down(x))), with `up` zero at the start."""

    def __init__(self, hidden: int, reduction_factor: int, activation: str) -> None:
        super().__init__()
        width = max(1, hidden // reduction_factor)
        self.down = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)
        update: torch.Tensor = self.up(self.act(self.down(h)))
        return x + update.to(x.dtype)


def targets(model: nn.Module, placement: str) -> list[str]:
    """Names of the modules whose outputs get an adapter."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":  # gpt2's Conv1D is a linear
            continue
        if placement == "houlsby" and name.endswith(ATTENTION_OUTPUTS):
            names.append(name)
        elif name.endswith(FEED_FORWARD_OUTPUTS) and not name.endswith(ATTENTION_OUTPUTS):
            names.append(name)
    if not names:
        raise ValueError(
            f"tuning.method adapter found no attention or feed-forward output layer in this {type(model).__name__} "
            f"(looked for names ending in {', '.join(ATTENTION_OUTPUTS + FEED_FORWARD_OUTPUTS)}); use lora for it"
        )
    return names


def _width(module: nn.Module) -> int:
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    return int(weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0])


def attach(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Put fresh adapters on `model` (described by `config`) and freeze everything else."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    adapters = nn.ModuleDict()
    for name in config["targets"]:
        target = modules[name]
        adapter = Bottleneck(_width(target), config["reduction_factor"], config["activation"])
        adapters[name.replace(".", "__")] = adapter
        target.register_forward_hook(lambda _m, _i, out, a=adapter: a(out))
    model.add_module(ROOT, adapters)
    return model


def add(model: nn.Module, spec: Any, base_uri: str | None) -> nn.Module:
    """Adapters per tuning.adapter (an AdapterSpec) on `model`; only they train."""
    config = {
        "placement": spec.placement, "reduction_factor": spec.reduction_factor, "activation": spec.activation,
        "targets": targets(model, spec.placement), "base_model_name_or_path": base_uri,
    }
    attach(model, config)
    model.kubetune_adapter_config = config  # type: ignore[assignment]
    log.info("Added bottleneck adapters placement=%s modules=%d trainable=%d", spec.placement, len(config["targets"]),
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    return model


def save(model: nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    adapters = getattr(model, ROOT)
    state = {k: v.detach().contiguous().cpu() for k, v in adapters.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(model.kubetune_adapter_config, indent=2) + "\n")


def is_adapter(path: Path) -> bool:
    return (path / CONFIG_FILE).exists()


def load(model: nn.Module, path: Path) -> nn.Module:
    """`model` (the base) with the adapters saved at `path`."""
    from safetensors.torch import load_file

    config = json.loads((path / CONFIG_FILE).read_text())
    attach(model, config)
    getattr(model, ROOT).load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    model.kubetune_adapter_config = config
    return model
