"""kubetune-train STAGERUN.json   (a stage of type diffusion)

Text-conditioned diffusion as Stable Diffusion trains it (diffusers' examples/text_to_image:
train_text_to_image.py and train_text_to_image_lora.py), with transformers' Trainer, on `imageCaption`
rows {image, caption} (JSONL, CSV, Parquet or a datasets folder; see data/images.py):

    pipeline    from model.uri or an earlier diffusion stage: a diffusers pipeline folder (model_index.json)
                of class StableDiffusionPipeline (a UNet2DConditionModel on the latents of its VAE) or
                IFPipeline (on pixels); its class, scheduler and VAE are kept. Otherwise built: a
                UNet2DConditionModel sized by diffusion.unet (cross-attention at every level but the
                first) and a DDPMScheduler (1000 steps, cosine betas, noise prediction), on pixels, saved as
                an IFPipeline. IFPipeline is diffusers' stock pixel-space text-to-image pipeline (DeepFloyd
                IF's first stage: a text-conditioned UNet2DConditionModel on pixels with a DDPMScheduler and
                any transformers text encoder), so it needs no VAE and loads with plain
                `DiffusionPipeline.from_pretrained(dir)`; kubetune writes it without IF's safety checker and
                watermarker (optional components there).
    text        a frozen CLIP text encoder (CLIPTextModel) and its tokenizer: from the StageRun's
                textEncoderUri (diffusion.textEncoderUri, else the output of the job's last clip stage),
                else the pipeline's own, else model.uri itself when it is a CLIP model. Captions are encoded
                by the pipeline's own `encode_prompt`, so training and inference see the same embeddings.
    loss        MSE between the UNet's prediction and the noise (the velocity for v-prediction schedulers)
                at timesteps drawn uniformly; with diffusion.snrGamma, each image's MSE is weighted by
                min(SNR, gamma) / SNR (min-SNR-gamma, Hang et al. 2023; diffusers.training_utils.compute_snr).
                A share diffusion.captionDropout of training captions is replaced by the empty caption, so
                the UNet also learns the unconditional prediction classifier-free guidance subtracts.
    tuning      full: every UNet weight (the text encoder and VAE stay frozen); lora (peft, as
                train_text_to_image_lora.py): low-rank updates on the UNet's attention projections to_q,
                to_k, to_v and to_out.0 when tuning.lora.targetModules is left at all-linear
    augment     training images: resized and centre-cropped to the model's side, flipped when
                diffusion.horizontalFlip, scaled to [-1, 1]; held-out images the same without the flip

The stage folder holds, with full tuning, the pipeline (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/, and vae/ for latent pipelines); with lora, the adapter as diffusers writes it
(pytorch_lora_weights.safetensors: `pipe.load_lora_weights(dir)` on the base pipeline) and, with merge,
the pipeline with the adapter fused into the UNet at `merged/`. Held-out figures, before and after:
evalLoss (the primary one), the plain noise-prediction MSE over the held-out rows at timesteps and
noise drawn from a fixed seed, the same draws before and after. samples_before.png and samples_after.png:
a grid of images generated for fixed captions (diffusion.sampleCaptions, else the first distinct
held-out captions), one row per caption, from fixed seeds, with DDIM over diffusion.inferenceSteps steps
and classifier-free guidance diffusion.guidanceScale.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from kubetune.api import StageRun
from kubetune.api.finetunejob import LoraSpec
from kubetune.api.registry import DiffusionSpec, UNetInit
from transformers import Trainer, TrainingArguments

from kubetune_trainer import common, models, storage
from kubetune_trainer.common import Context
from kubetune_trainer.data import images

log = logging.getLogger("kubetune_trainer")

EVAL_LIMIT = 512  # held-out rows scored before and after
EVAL_BATCH = 64
EVAL_SEED = 1234  # the held-out timesteps and noise
SAMPLE_SEED = 0  # the sample grids' starting noise
SAMPLE_CAPTIONS = 10  # default rows of the sample grids: the first distinct held-out captions
GRID_CELL = 64  # smallest side in pixels of a grid cell (small images are scaled up, pixels kept sharp)
METHODS = ("full", "lora")
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention, as train_text_to_image_lora.py
PIPELINES = ("StableDiffusionPipeline", "IFPipeline")  # the pipeline classes kubetune trains
IF_TOKENS = 77  # IFPipeline encodes prompts to 77 tokens (CLIP's context length)
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_CACHE = 1024  # distinct captions whose embeddings are kept while training


# --- data ---------------------------------------------------------------------------------


def caption_of(row: dict[str, Any]) -> dict[str, Any]:
    return {"caption": str(row["caption"])}


def pixel_transform(side: int, flip: bool) -> Any:
    """PIL image -> a [-1, 1] tensor of side x side (resize, centre crop, flip when asked), as diffusers' examples."""
    from torchvision.transforms import v2

    steps: list[Any] = [v2.Resize(side, antialias=True), v2.CenterCrop(side)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])]
    return v2.Compose(steps)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pixel_values": torch.stack([b["image"] for b in batch]), "captions": [b["caption"] for b in batch]}


# --- model --------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' load report (a CLIP model's vision tower is left out on purpose) and diffusers'
    note that IFPipeline's text encoder is usually T5 (any transformers text encoder serves)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])


def is_pipeline(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def load_text_encoder(uri: str, run: StageRun) -> tuple[Any, Any]:
    """(CLIPTextModel, tokenizer) from a CLIP model or CLIPTextModel folder (a clip stage's output), or from
    the text_encoder/ and tokenizer/ of a pipeline folder; frozen."""
    from transformers import AutoTokenizer, CLIPTextModel

    path = storage.local_path(uri)
    pipeline = is_pipeline(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer" if pipeline else path),
                                              trust_remote_code=run.trust_remote_code)
    with quiet():
        encoder = CLIPTextModel.from_pretrained(str(path / "text_encoder" if pipeline else path),
                                                dtype=models.base_dtype(run))
    log.info("Loaded text encoder uri=%s parameters=%d", uri, models.count_parameters(encoder))
    return encoder.requires_grad_(False).eval(), tokenizer


def unet_config(spec: UNetInit, cross_attention_dim: int) -> dict[str, Any]:
    """UNet2DConditionModel's config for diffusion.unet: cross-attention at every level but the first."""
    levels = len(spec.block_out_channels)
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1)
    return {
        # IFPipeline splits the UNet's output into noise and variance (its UNets learn both); the variance half is
        # there, untrained, and left aside by the sampler, since the scheduler's variance is fixed
        "sample_size": spec.sample_size, "in_channels": 3, "out_channels": 6,
        "block_out_channels": list(spec.block_out_channels), "layers_per_block": spec.layers_per_block,
        "down_block_types": down, "up_block_types": ["CrossAttnUpBlock2D" if "Attn" in d else "UpBlock2D"
                                                     for d in reversed(down)],
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": spec.attention_head_dim,
        "norm_num_groups": spec.norm_num_groups,
    }


def build(run: StageRun, spec: DiffusionSpec) -> Any:
    """The pipeline the stage trains: loaded from run.modelUri when that is a diffusers pipeline (its text
    encoder replaced by run.textEncoderUri's when given), else built around a new UNet (an IFPipeline)."""
    from diffusers import DDPMScheduler, DiffusionPipeline, IFPipeline, UNet2DConditionModel

    source = storage.local_path(run.model_uri) if run.model_uri else None
    dtype = models.base_dtype(run)
    if source is not None and is_pipeline(source):
        if spec.unet is not None:
            raise ValueError(f"diffusion.unet builds a new UNet, but stage {run.stage} starts from the pipeline at "
                             f"{run.model_uri}; remove diffusion.unet to fine-tune that pipeline's UNet")
        with quiet():
            pipe = DiffusionPipeline.from_pretrained(str(source), dtype=dtype, trust_remote_code=run.trust_remote_code)
        if type(pipe).__name__ not in PIPELINES:
            raise ValueError(f"the pipeline at {run.model_uri} is a {type(pipe).__name__}; kubetune trains "
                             f"{' and '.join(PIPELINES)} folders (a UNet2DConditionModel and one CLIP text encoder)")
        if run.text_encoder_uri:
            encoder, tokenizer = load_text_encoder(run.text_encoder_uri, run)
            pipe.register_modules(text_encoder=encoder.to(dtype), tokenizer=tokenizer)
        log.info("Loaded pipeline uri=%s class=%s unet=%d", run.model_uri, type(pipe).__name__,
                 models.count_parameters(pipe.unet))
    else:
        if spec.unet is None:
            raise ValueError(f"stage {run.stage} starts from no diffusers pipeline (model_index.json); set "
                             "diffusion.unet to build a UNet from scratch, or start from a pipeline (model.uri)")
        uri = run.text_encoder_uri or run.model_uri
        if uri is None:
            raise ValueError("a diffusion stage conditions on a CLIP text encoder: set diffusion.textEncoderUri, or "
                             "put a clip stage before it")
        encoder, tokenizer = load_text_encoder(uri, run)
        if encoder.config.max_position_embeddings < IF_TOKENS:
            raise ValueError(f"the text encoder at {uri} reads {encoder.config.max_position_embeddings} tokens; "
                             f"the pipeline encodes captions to {IF_TOKENS} (set model.init.maxPositionEmbeddings to "
                             f"at least {IF_TOKENS} for the clip stage)")
        unet = UNet2DConditionModel(**unet_config(spec.unet, encoder.config.hidden_size))
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                  prediction_type="epsilon", variance_type="fixed_small")
        pipe = IFPipeline(tokenizer=tokenizer, text_encoder=encoder, unet=unet, scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, watermarker=None,
                          requires_safety_checker=False)
        log.info("Initialised UNet parameters=%d sampleSize=%d blockOutChannels=%s", models.count_parameters(unet),
                 spec.unet.sample_size, spec.unet.block_out_channels)
    if pipe.text_encoder.config.hidden_size != pipe.unet.config.cross_attention_dim:
        raise ValueError(f"the text encoder's width {pipe.text_encoder.config.hidden_size} is not the UNet's "
                         f"cross_attention_dim {pipe.unet.config.cross_attention_dim}; use the text encoder the "
                         "pipeline was trained with (leave diffusion.textEncoderUri unset)")
    pipe.text_encoder.requires_grad_(False).eval()
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_side(pipe: Any) -> int:
    """Side in pixels of the images the pipeline makes (the UNet's sample size, times the VAE's scale)."""
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 1) if _has_vae(pipe) else 1)


def _has_vae(pipe: Any) -> bool:
    return getattr(pipe, "vae", None) is not None


def adapter_config(run: StageRun) -> Any:
    """peft's LoraConfig (None for full): the UNet's attention projections when targetModules is all-linear."""
    from peft import LoraConfig

    if run.tuning.method == "full":
        return None
    cfg = run.tuning.lora or LoraSpec()
    targets = list(cfg.target_modules)
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian",
                      use_dora=cfg.use_dora, target_modules=LORA_TARGETS if targets == ["all-linear"] else targets)


# --- the loss -----------------------------------------------------------------------------


@torch.no_grad()
def encode(pipe: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    """Caption embeddings as the pipeline computes them for a prompt at inference."""
    if "clean_caption" in inspect.signature(pipe.encode_prompt).parameters:  # IFPipeline
        embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device, clean_caption=False)
    else:  # StableDiffusionPipeline
        embeds, _ = pipe.encode_prompt(captions, device, 1, False)
    return torch.as_tensor(embeds)


@torch.no_grad()
def to_model_space(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """What the UNet denoises: the VAE's scaled latents, or the pixels themselves."""
    if not _has_vae(pipe):
        return pixels
    vae = pipe.vae
    return torch.as_tensor(vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor)


def noise_loss(unet: Any, pipe: Any, x0: torch.Tensor, embeds: torch.Tensor, snr_gamma: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image noise-prediction MSE at uniform timesteps (min-SNR weighted with snr_gamma)."""
    scheduler = pipe.scheduler
    n, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device, x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    noisy = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        raise ValueError(f"the pipeline's scheduler predicts {kind}; kubetune trains epsilon and v_prediction")
    pred = unet(noisy, t, encoder_hidden_states=embeds.to(x0.dtype), return_dict=False)[0]
    pred = pred[:, : x0.shape[1]]  # IF's UNets also predict a variance, which the MSE leaves alone
    mse = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        mse = mse * weight
    return mse


class NoisePredictionTrainer(Trainer):
    """transformers' Trainer on the UNet: each batch's captions (some dropped) are encoded by the frozen text
    encoder, its images noised at random timesteps, and the UNet's noise prediction scored by MSE."""

    def __init__(self, *args: Any, pipe: Any, spec: DiffusionSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipe, self.spec = pipe, spec
        self.embeddings: dict[str, torch.Tensor] = {}  # caption -> its embedding (the encoder is frozen)

    def encode(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """The captions' embeddings, the first EMBEDDING_CACHE distinct captions kept for reuse."""
        new = [c for c in dict.fromkeys(captions) if c not in self.embeddings]
        if new:
            fresh = dict(zip(new, encode(self.pipe, new, device), strict=True))
            if len(self.embeddings) < EMBEDDING_CACHE:
                self.embeddings.update(fresh)
        else:
            fresh = {}
        return torch.stack([fresh[c] if c in fresh else self.embeddings[c] for c in captions])

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        pixels = inputs["pixel_values"]
        captions = list(inputs["captions"])
        if model.training and self.spec.caption_dropout > 0:
            dropped = (torch.rand(len(captions)) < self.spec.caption_dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, dropped, strict=True)]
        device = pixels.device
        for part in ("text_encoder", "vae"):
            module = getattr(self.pipe, part, None)
            if module is not None and module.device != device:
                module.to(device)
        embeds = self.encode(captions, device)
        x0 = to_model_space(self.pipe, pixels)
        loss = noise_loss(model, self.pipe, x0, embeds, self.spec.snr_gamma if model.training else None).mean()
        return (loss, {}) if return_outputs else loss


# --- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(pipe: Any, rows: list[dict[str, Any]]) -> float:
    """Plain noise-prediction MSE over the held-out rows, timesteps and noise drawn from EVAL_SEED."""
    unet = pipe.unet.eval()
    device = unet.device
    for part in ("text_encoder", "vae"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).to(device)
    data = images.ImageRows(rows, caption_of, pixel_transform(image_side(pipe), flip=False))
    generator = torch.Generator().manual_seed(EVAL_SEED)
    total = 0.0
    for start in range(0, len(rows), EVAL_BATCH):
        batch = collate([data[i] for i in range(start, min(start + EVAL_BATCH, len(rows)))])
        pixels = batch["pixel_values"].to(device, unet.dtype)
        x0 = to_model_space(pipe, pixels)
        total += float(noise_loss(unet, pipe, x0.to(unet.dtype), encode(pipe, batch["captions"], device),
                                  generator=generator).sum())
    return total / max(len(rows), 1)


def sample_captions(spec: DiffusionSpec, held_out: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    if spec.sample_captions:
        return list(spec.sample_captions)
    seen: dict[str, None] = {}
    for r in held_out or rows:
        seen.setdefault(str(r["caption"]), None)
        if len(seen) == SAMPLE_CAPTIONS:
            break
    return list(seen)


@torch.no_grad()
def generate(pipe: Any, captions: list[str], per_caption: int, steps: int, guidance: float,
             seed: int = SAMPLE_SEED) -> list[list[Any]]:
    """per_caption PIL images for each caption, with DDIM on the pipeline's schedule, from fixed seeds."""
    from diffusers import DDIMScheduler

    trained = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(trained.config)
    extra = {"clean_caption": False} if "clean_caption" in inspect.signature(pipe.__call__).parameters else {}
    pipe.unet.eval()
    out = []
    try:
        for i, caption in enumerate(captions):
            generator = torch.Generator().manual_seed(seed + i)
            result = pipe(prompt=[caption] * per_caption, num_inference_steps=steps, guidance_scale=guidance,
                          generator=generator, output_type="pil", **extra)
            out.append(list(result.images))
    finally:
        pipe.scheduler = trained
    return out


def grid(rows: list[list[Any]]) -> Any:
    """One PNG-ready image: a row per caption; cells scaled up (nearest) to at least GRID_CELL pixels."""
    from PIL import Image

    side = rows[0][0].width
    cell = side * max(1, -(-GRID_CELL // side))
    pad = 2
    canvas = Image.new("RGB", (len(rows[0]) * (cell + pad) + pad, len(rows) * (cell + pad) + pad), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                         (pad + x * (cell + pad), pad + y * (cell + pad)))
    return canvas


def save_samples(pipe: Any, captions: list[str], spec: DiffusionSpec, path: Path) -> None:
    images_ = generate(pipe, captions, spec.samples_per_caption, spec.inference_steps, spec.guidance_scale)
    grid(images_).save(path)
    log.info("Wrote samples path=%s captions=%d", path, len(captions))


# --- saving -------------------------------------------------------------------------------


def save(pipe: Any, unet: Any, run: StageRun, spec: DiffusionSpec, out: Path) -> Path:
    """Write the pipeline (full) or the LoRA adapter and, with merge, the fused pipeline; returns the folder of
    the pipeline the stage made (out, out/merged), or out for an unmerged adapter."""
    if run.tuning.method == "full":
        pipe.register_modules(unet=unet)
        pipe.save_pretrained(str(out), safe_serialization=True)
        return out
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(save_directory=str(out), unet_lora_layers=layers, safe_serialization=True)
    if not run.merge:
        return out
    merged = with_adapter(run, spec, out)
    merged.fuse_lora()
    merged.unload_lora_weights()
    merged.save_pretrained(str(out / "merged"), safe_serialization=True)
    return out / "merged"


def with_adapter(run: StageRun, spec: DiffusionSpec, out: Path) -> Any:
    """The stage's base pipeline with the adapter in `out` loaded (as a user loads it)."""
    pipe = build(run, spec)
    with quiet():  # diffusers notes that the adapter has no text-encoder part
        pipe.load_lora_weights(str(out), weight_name=LORA_FILE)
    return pipe


def load_trained(run: StageRun, spec: DiffusionSpec, written: Path) -> Any:
    """What the stage wrote, loaded back: the pipeline folder, or the base pipeline with the adapter."""
    from diffusers import DiffusionPipeline

    if is_pipeline(written):
        with quiet():
            pipe = DiffusionPipeline.from_pretrained(str(written))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return with_adapter(run, spec, written)


# --- the stage ----------------------------------------------------------------------------


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    spec = run.settings(DiffusionSpec)
    if run.tuning.method not in METHODS:
        raise ValueError(f"a diffusion stage trains with tuning.method {' or '.join(METHODS)}, not {run.tuning.method}")
    if common.deepspeed_config(run) is not None:
        raise ValueError("a diffusion stage runs plain data parallel (as diffusers' training examples); leave "
                         "distributed.deepspeed unset")

    # --- load
    rows, held_out = common.load_data(run)
    held_out = held_out[:EVAL_LIMIT]

    # --- build
    models.check_tuning(run)
    pipe = build(run, spec)
    unet = pipe.unet
    lora = adapter_config(run)
    if lora is not None:
        from diffusers.training_utils import cast_training_params

        unet.requires_grad_(False)
        unet.add_adapter(lora)
        cast_training_params(unet, dtype=torch.float32)  # the adapter trains in fp32 on a half-precision base
    if run.hyperparameters.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    log.info("Built diffusion pipeline class=%s trainable=%d side=%d", type(pipe).__name__,
             models.count_parameters(unet, trainable=True), image_side(pipe))
    captions = sample_captions(spec, held_out, rows)

    before = None
    if ctx.is_main:
        if held_out:
            before = {"evalLoss": eval_loss(pipe, held_out)}
        save_samples(pipe, captions, spec, ctx.out / "samples_before.png")
    common.barrier()

    args = common.training_args(
        run, ctx, TrainingArguments, evaluate=bool(run.hyperparameters.eval_steps and held_out),
        remove_unused_columns=False,  # the collator reads "image" and "caption"
        include_num_input_tokens_seen="no",
        activation_checkpointing=False,  # the UNet's own (enable_gradient_checkpointing), set above
    )
    side = image_side(pipe)
    trainer = NoisePredictionTrainer(
        model=unet,
        args=args,
        train_dataset=images.ImageRows(rows, caption_of, pixel_transform(side, spec.horizontal_flip)),
        eval_dataset=images.ImageRows(held_out, caption_of, pixel_transform(side, False))
        if args.eval_strategy != "no" else None,
        data_collator=collate,
        callbacks=ctx.callbacks,
        pipe=pipe,
        spec=spec,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    after = sample = None
    if ctx.is_main:
        written = save(pipe, trainer.accelerator.unwrap_model(trainer.model), run, spec, ctx.out)
        trained = load_trained(run, spec, written)
        if held_out:
            after = {"evalLoss": eval_loss(trained, held_out)}
        save_samples(trained, captions, spec, ctx.out / "samples_after.png")
        sample = {"captions": captions, "before": "samples_before.png", "after": "samples_after.png",
                  "pipeline": type(trained).__name__}
    common.barrier()
    return common.report(run, ctx, trainer, before, after, sample, len(held_out))
