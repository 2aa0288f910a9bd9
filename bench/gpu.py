"""The trainer on one GPU against plain TRL: QLoRA SFT of a ~1B Llama-shaped model, and DPO.

    python -m bench.gpu [--size 1b] [--steps 40] [--seq 2048] [--write docs/benchmarks.md]
    python -m bench.gpu --size tiny --steps 4                  (the CPU smoke size)

For the accelerator machine (an H100/H200), where a session has one: `bench/gpu-wheels.sh`
downloads the wheels it may lack beside the working tree, and the command at the end of that
script installs them there. tests/bench/test_bench_gpu.py runs every case at --size tiny on CPU,
so the script cannot rot where no GPU is lent.

In a temporary folder: a Llama-shaped model with random weights (1b: hidden 2048, 16 layers, 32
heads, 8 KV heads, MLP 8192, vocabulary 32000: 1.1 B parameters, saved in bf16) and a byte-level
BPE tokenizer trained on the project's synthetic corpus; SFT rows of that corpus of random lengths
up to --seq tokens (so padding and packing matter), and preference rows (prompt, chosen, rejected)
of up to --seq / 2 tokens each. Then, each case in a process of its own, one at a time:

    sft  plain TRL      trl.SFTTrainer, QLoRA (nf4, double quantization, LoRA r 16 on every linear
                        layer), padded batches, SDPA attention, torch's AdamW without fusing
    sft  kubetune       kubetune-train with the same settings, hyperparameters.fastPath false
    sft  kubetune fast  fastPath true: fused AdamW; Liger's kernels where liger-kernel is
                        installed; FlashAttention-2 and padding-free packing where flash-attn is
    dpo  (the same three, LoRA r 16 on the bf16 base, the reference the base without the adapter)

Gradient checkpointing is on in every case (--no-checkpointing turns it off in every case).
Figures: tokens/s (the tokens TRL counts as trained, padding left out, over the training loop's
seconds), peak GPU memory (torch.cuda.max_memory_allocated in the training process: kubetune's
metrics.json `peakGpuMemoryBytes`), MFU (6 x parameters x tokens/s over the card's dense bf16
peak; the frozen 4-bit base is counted as parameters: its forward and backward are computed),
and the loss at each logged step: the largest difference from plain TRL's curve (the fast path
packs, so its steps see other batches: its curve is compared by its mean over the run).
Ratios against plain TRL: tokens/s (goal: >= 2.0 for QLoRA SFT with the fast path) and peak
memory (goal <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Trainer on one GPU"
SIZES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 600},
}
# Dense bf16 peak of the cards this may run on (FLOP/s), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
LORA: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}
CASES = [(stage, side) for stage in ("sft", "dpo") for side in ("plain TRL", "kubetune", "kubetune fast")]


@dataclass(frozen=True)
class Settings:
    size: str = "1b"
    steps: int = 40
    seq: int = 2048
    batch_size: int = 4
    learning_rate: float = 2e-4
    seed: int = 42
    logging_steps: int = 5
    checkpointing: bool = True


@dataclass
class Result:
    stage: str
    side: str
    tokens: int
    train_seconds: float
    peak_memory_gib: float | None
    losses: dict[int, float]
    fast_path: dict[str, bool] | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


# --- preparation (not measured) -----------------------------------------------------------


def words(seed: int) -> list[str]:
    """The words of the project's synthetic pretraining corpus (kubetune_trainer.data.synthetic)."""
    from kubetune_trainer.data.synthetic import make_world, pretrain_rows

    rng = random.Random(seed)
    return " ".join(r["text"] for r in pretrain_rows(rng, make_world(rng), 2000)).split()


def prepare(root: Path, s: Settings) -> tuple[Path, Path, Path, int]:
    """(model folder, SFT rows, preference rows, the model's parameters)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus, rng = words(s.seed), random.Random(s.seed)
    shape = SIZES[s.size]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(corpus[i:i + 200]) for i in range(0, len(corpus), 200)],
                            trainers.BpeTrainer(vocab_size=shape["vocab_size"], special_tokens=["<s>", "</s>", "<pad>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model_dir = root / "model"
    tokenizer.save_pretrained(model_dir)
    # the embedding keeps the shape's vocabulary (a corpus this small gives BPE fewer merges), as a 1B model's has
    config = LlamaConfig(**{**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))},
                         max_position_embeddings=max(4096, s.seq),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(s.seed)
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    del model

    def text(n_words: int) -> str:
        start = rng.randrange(len(corpus) - n_words)
        return " ".join(corpus[start:start + n_words])
    rows = s.steps * s.batch_size + 16
    words_per_token = 0.7  # about, for a byte-level BPE of this corpus; rows are cut at --seq tokens anyway
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"text": text(rng.randint(s.seq // 8, s.seq) * 7 // 10)}) + "\n"
                           for _ in range(rows)))
    half = int(s.seq / 2 * words_per_token)
    pref = root / "preference.jsonl"
    pref.write_text("".join(json.dumps({"prompt": text(rng.randint(half // 4, half)), "chosen": " " + text(rng.randint(8, half)),
                                        "rejected": " " + text(rng.randint(8, half))}) + "\n" for _ in range(rows)))
    return model_dir, sft, pref, parameters


# --- the cases ----------------------------------------------------------------------------


def losses_of(state: dict[str, Any]) -> dict[int, float]:
    return {int(e["step"]): float(e["loss"]) for e in state.get("log_history", []) if "loss" in e}


def last_log(state: dict[str, Any], key: str) -> float:
    return float(next(e[key] for e in reversed(state["log_history"]) if key in e))


def plain(stage: str, model_dir: Path, rows: Path, out: Path, s: Settings) -> dict[str, Any]:
    """The case written with TRL, PEFT, transformers and bitsandbytes alone (no kubetune import): the
    settings kubetune's recipes (recipes/sft.py, recipes/dpo.py, common.training_args) give TRL."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if stage == "sft" and cuda:  # QLoRA (bitsandbytes' 4-bit runs on CPU too, but the smoke size skips it)
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if "quantization_config" in kwargs:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.checkpointing)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    common: dict[str, Any] = dict(output_dir=str(out), max_steps=s.steps, learning_rate=s.learning_rate,
                  per_device_train_batch_size=s.batch_size, seed=s.seed, data_seed=s.seed, warmup_steps=0.0,
                  lr_scheduler_type="linear", save_strategy="no", logging_strategy="steps",
                  logging_steps=s.logging_steps, logging_first_step=True, activation_checkpointing=s.checkpointing,
                  bf16=dtype == torch.bfloat16, use_cpu=not cuda, report_to="none", disable_tqdm=True,
                  include_num_input_tokens_seen="all", dataloader_num_workers=0, optim="adamw_torch",
                  use_liger_kernel=False)
    data = load_dataset("json", data_files=str(rows), split="train")
    trainer: Any
    if stage == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=s.seq, packing=False),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora)
    else:
        trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(**common, max_length=s.seq, beta=0.1),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    history = {"log_history": trainer.state.log_history}
    return {"tokens": int(trainer.state.num_input_tokens_seen or 0), "trainSeconds": last_log(history, "train_runtime"),
            "peakGpuMemoryBytes": torch.cuda.max_memory_allocated() if cuda else None, "losses": losses_of(history)}


def kubetune_stagerun(stage: str, model_dir: Path, rows: Path, out: Path, s: Settings, fast: bool) -> dict[str, Any]:
    """The StageRun kubetune-train reads: what the operator renders for this stage."""
    import torch

    qlora = stage == "sft" and torch.cuda.is_available()
    run: dict[str, Any] = {
        "job": "bench", "stage": stage, "type": stage, "index": 0, "stageCount": 1,
        "dataset": {"uri": str(rows), "format": "text" if stage == "sft" else "preference"},
        "tuning": {"method": "qlora" if qlora else "lora", "lora": LORA},
        "hyperparameters": {"maxSteps": s.steps, "learningRate": s.learning_rate, "batchSize": s.batch_size,
                            "maxLength": s.seq, "seed": s.seed, "loggingSteps": s.logging_steps,
                            "saveSteps": 10 * s.steps, "gradientCheckpointing": s.checkpointing, "fastPath": fast},
        "distributed": {}, "outputUri": str(out), "metricsPort": 0, "modelUri": str(model_dir),
    }
    if stage == "dpo":
        run["referenceModelUri"] = str(model_dir)
        run["dpo"] = {"beta": 0.1}
    return run


def run_case(stage: str, side: str, model_dir: Path, rows: Path, work: Path, s: Settings) -> Result:
    out = work / f"{stage}-{side.replace(' ', '-')}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if side == "plain TRL":
        spec = out.with_suffix(".json")
        spec.write_text(json.dumps({"stage": stage, "model": str(model_dir), "rows": str(rows), "out": str(out),
                                    "settings": asdict(s)}))
        done = subprocess.run([sys.executable, "-m", "bench.gpu", "--plain", str(spec)], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{stage} {side} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        got = json.loads((out / "bench.json").read_text())
        return Result(stage, side, got["tokens"], got["trainSeconds"], gib(got["peakGpuMemoryBytes"]),
                      {int(k): v for k, v in got["losses"].items()})
    stagerun = out.with_suffix(".stagerun.json")
    stagerun.write_text(json.dumps(kubetune_stagerun(stage, model_dir, rows, out, s, fast=side.endswith("fast"))))
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer.launch", str(stagerun)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{stage} {side} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    state = max((json.loads(p.read_text()) for p in out.glob("**/trainer_state.json")), key=lambda t: t["global_step"])
    return Result(stage, side, int(metrics["tokensSeen"]), last_log(state, "train_runtime"),
                  gib(metrics.get("peakGpuMemoryBytes")), losses_of(state), metrics["fastPath"])


def gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


# --- report -------------------------------------------------------------------------------


def card() -> tuple[str, float | None]:
    """(the device's name, its dense bf16 peak FLOP/s or None)."""
    import torch

    if not torch.cuda.is_available():
        return f"{machine()}: the smoke size, no GPU", None
    name = torch.cuda.get_device_name(0)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def table(results: list[Result], parameters: int, peak: float | None) -> str:
    by = {(r.stage, r.side): r for r in results}
    lines = ["| stage | side | tokens/s | x plain TRL | peak GPU memory (GiB) | x plain TRL | MFU | "
             "largest loss difference from plain TRL | fast path |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        base = by[(r.stage, "plain TRL")]
        speed = r.tokens_per_second / base.tokens_per_second if base.tokens_per_second else float("nan")
        memory = (f"{r.peak_memory_gib:.2f}", f"{r.peak_memory_gib / base.peak_memory_gib:.2f}") \
            if r.peak_memory_gib and base.peak_memory_gib else ("n/a", "n/a")
        mfu = f"{6 * parameters * r.tokens_per_second / peak:.1%}" if peak else "n/a"
        common = sorted(set(r.losses) & set(base.losses))
        if r.side == "plain TRL":
            diff = "-"
        elif r.fast_path and r.fast_path.get("packing"):  # other batches: the curves' means
            diff = f"{abs(statistics.mean(r.losses.values()) - statistics.mean(base.losses.values())):.4f} (means)"
        else:
            diff = f"{max(abs(r.losses[k] - base.losses[k]) for k in common):.4f}" if common else "n/a"
        on = ", ".join(k for k, v in (r.fast_path or {}).items() if v) or "-"
        lines.append(f"| {r.stage} | {r.side} | {r.tokens_per_second:,.0f} | {speed:.2f} | {memory[0]} | {memory[1]} | "
                     f"{mfu} | {diff} | {on} |")
    return "\n".join(lines)


def measure(s: Settings, stages: list[str], work: Path | None = None) -> tuple[list[Result], int]:
    """Every case of `stages` (sft, dpo), one process at a time; the results and the model's parameters."""
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-gpu-") as tmp:
        work = work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        model_dir, sft_rows, pref_rows, parameters = prepare(work, s)
        print(f"prepared the {s.size} model and data in {time.monotonic() - started:.0f}s", flush=True)
        results = []
        for stage, side in CASES:
            if stage in stages:
                t = time.monotonic()
                results.append(run_case(stage, side, model_dir, sft_rows if stage == "sft" else pref_rows, work, s))
                print(f"{stage} {side}: {results[-1].tokens_per_second:,.0f} tokens/s "
                      f"({time.monotonic() - t:.0f}s)", flush=True)
    return results, parameters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--seq", type=int, default=Settings.seq)
    p.add_argument("--batch-size", type=int, default=Settings.batch_size)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--stages", default="sft,dpo", help="comma-separated: sft, dpo")
    p.add_argument("--work", type=Path, default=None, help="keep the model, data and runs here")
    p.add_argument("--write", type=Path, default=None, help="write the figures into this markdown file")
    p.add_argument("--plain", type=Path, default=None, help=argparse.SUPPRESS)  # one plain TRL case (a subprocess)
    args = p.parse_args(argv)
    if args.plain:
        spec = json.loads(args.plain.read_text())
        got = plain(spec["stage"], Path(spec["model"]), Path(spec["rows"]), Path(spec["out"]), Settings(**spec["settings"]))
        Path(spec["out"], "bench.json").write_text(json.dumps(got))
        return 0
    s = Settings(size=args.size, steps=args.steps, seq=args.seq, batch_size=args.batch_size,
                 checkpointing=not args.no_checkpointing, logging_steps=max(1, min(5, args.steps // 4)))
    results, parameters = measure(s, args.stages.split(","), args.work)
    name, peak = card()
    command = "python -m bench.gpu " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    text = (f"{SECTION}\n\n<!-- written by bench/gpu.py -->\nDevice: {name}. Date: "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Settings: {asdict(s)}.\n\n    {command.strip()}\n\n"
            + f"Model: {parameters / 1e6:,.1f} M parameters.\n\n" + table(results, parameters, peak) + "\n")
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
