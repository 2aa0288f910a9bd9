"""kubetune-train STAGERUN.json   (a stage of type clip)

CLIP (Radford et al. 2021) with transformers' Trainer on `imageCaption` rows {image, caption,
label (optional)} (JSONL, CSV, Parquet or a datasets folder; see data/images.py):

    model       CLIPModel from model.uri (a Hugging Face CLIP, e.g. openai/clip-vit-base-patch32, or a
                previous stage) with its CLIPProcessor, or built from model.init (architecture clip):
                a ViT vision tower on imageSize/patchSize patches per side and a text tower, both
                numLayers blocks of width hiddenSize with numHeads heads, projected to hiddenSize,
                and a byte-level BPE tokenizer trained on the training captions (model.init.tokenizer,
                by default trained with its defaults) that ends every caption with its end token
    loss        the symmetric contrastive loss over each batch's N x N image-caption similarities,
                scaled by the learned temperature (CLIPModel's `return_loss=True`); on several
                processes over the global batch, each gathering all processes' embeddings (OpenCLIP's
                gather_with_grad), so the loss curve is the one of a single process (plain data
                parallel or DeepSpeed ZeRO-2; the temperature is held as a 1-element tensor while
                training, which DeepSpeed's start-up broadcast needs, and saved in CLIPModel's shape;
                ZeRO-3 on several processes is refused, as it partitions the temperature the loss reads)
    tuning      full; lora and qlora (peft) on the attention's query and value projections of both towers
                when tuning.lora.targetModules is left at all-linear; the temperature stays frozen
    augment     training images only: torchvision v2 random resized crop (clip.cropScale, square) and,
                when asked, a left-right flip (clip.horizontalFlip); held-out images are only resized
                and normalised by the image processor, as when served

The stage folder holds the model (or adapter, and `merged/` for the next stage) with its CLIPProcessor,
so `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` load it. Held-out figures, before and
after, over consecutive batches of RETRIEVAL_BATCH rows (one batch of all when there are fewer; chance
recall@1 is 1/batch): textToImageRecallAt1 (the primary one), textToImageRecallAt5, imageToTextRecallAt1
and imageToTextRecallAt5. A retrieval counts when the retrieved row has the query's caption (its own
pair, or a row with the same caption word for word, which no model could tell apart). With labels on
the held-out rows, zeroShotAccuracy: each image gets the class whose prompt (clip.promptTemplate, "a
photo of a {label}") is nearest to it, among the labels of the training and held-out rows. metrics.json
also records that prompt template (`zeroShot.promptTemplate`), which kubetune-serve's zero-shot labels use.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from kubetune.api import StageRun
from kubetune.api.finetunejob import DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE, TokenizerTrain
from kubetune.api.registry import ClipSpec
from transformers import Trainer, TrainingArguments

from kubetune_trainer import common, models, storage
from kubetune_trainer.common import Context
from kubetune_trainer.data import images

log = logging.getLogger("kubetune_trainer")

EVAL_LIMIT = 5000  # held-out rows scored before and after
EVAL_BATCH = 64
RETRIEVAL_BATCH = 32  # rows ranked against each other for recall@k (chance recall@1: 1/32)
METHODS = ("full", "lora", "qlora")
LORA_TARGETS = ["q_proj", "v_proj"]  # the attention's query and value projections, in both towers
MAX_CAPTION_TOKENS = 77  # CLIP's context length: the text tower's positions when model.init leaves them


# --- data ---------------------------------------------------------------------------------


def caption_of(row: dict[str, Any]) -> dict[str, Any]:
    return {"caption": row["caption"]}


class Collate:
    """A batch through the CLIPProcessor: input_ids, attention_mask, pixel_values, and return_loss."""

    def __init__(self, processor: Any, max_tokens: int) -> None:
        self.processor, self.max_tokens = processor, max_tokens

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = dict(encode_texts(self.processor, [b["caption"] for b in batch], self.max_tokens))
        out["pixel_values"] = self.processor(images=[b["image"] for b in batch], return_tensors="pt")["pixel_values"]
        out["return_loss"] = True
        return out


def encode_texts(processor: Any, texts: list[str], max_tokens: int) -> Any:
    return processor.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")


def augmentation(processor: Any, spec: ClipSpec) -> Any:
    """torchvision v2 transforms on PIL training images: a square random resized crop, then a flip if asked."""
    from torchvision.transforms import v2

    from kubetune_trainer.recipes.image_classification import image_side

    side = image_side(processor.image_processor)
    steps: list[Any] = [v2.RandomResizedCrop((side, side), scale=(spec.crop_scale, 1.0), ratio=(1.0, 1.0),
                                             antialias=True)]
    if spec.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


# --- model --------------------------------------------------------------------------------


def caption_tokenizer(run: StageRun, captions: list[str]) -> Any:
    """model.init's tokenizer (an existing one, or byte-level BPE trained on the captions) that ends each
    caption with its end token, where the text tower reads the caption's embedding."""
    from tokenizers.processors import TemplateProcessing

    init = run.model_init
    assert init is not None
    if init.tokenizer is not None:
        tokenizer = models.load_tokenizer(run, captions)
    else:
        train = TokenizerTrain()
        tokenizer = models.train_tokenizer(captions, train.vocab_size, train.min_frequency)
    tokenizer.chat_template = None  # captions are no conversations
    if tokenizer("a")["input_ids"][-1] != tokenizer.eos_token_id:
        eos = tokenizer.eos_token
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_token_id)])
    return tokenizer


def clip_config(init: Any, tokenizer: Any) -> Any:
    """CLIPConfig of a model built from model.init: both towers numLayers blocks of width hiddenSize."""
    from transformers import CLIPConfig

    side, patch = init.image_size or DEFAULT_IMAGE_SIZE, init.patch_size or DEFAULT_PATCH_SIZE["clip"]
    if side % patch:
        raise ValueError(f"model.init.imageSize {side} must be a multiple of patchSize {patch} for clip")
    tower = {"hidden_size": init.hidden_size, "num_hidden_layers": init.num_layers,
             "num_attention_heads": init.num_heads, "intermediate_size": init.intermediate_size or 4 * init.hidden_size}
    return CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer),
                     "max_position_embeddings": min(init.max_position_embeddings, MAX_CAPTION_TOKENS),
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                     else tokenizer.eos_token_id},
        vision_config={**tower, "image_size": side, "patch_size": patch},
        projection_dim=init.hidden_size,
    )


def build(run: StageRun, captions: list[str]) -> tuple[Any, Any]:
    """(model, CLIPProcessor): from run.modelUri, or built from run.modelInit."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    if run.model_uri is None:
        init = models.init_of(run)
        if init.architecture != "clip":
            raise ValueError(f"model.init.architecture {init.architecture} is no CLIP model; a clip stage builds clip")
        tokenizer = caption_tokenizer(run, captions)
        model = CLIPModel(clip_config(init, tokenizer))
        tokenizer.model_max_length = max_tokens(model)  # what truncation=True cuts captions to when served
        side = init.image_size or DEFAULT_IMAGE_SIZE
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}), tokenizer=tokenizer)
        log.info("Initialised model architecture=clip parameters=%d vocabulary=%d", models.count_parameters(model),
                 len(tokenizer))
        return model, processor
    path = str(storage.local_path(run.model_uri))
    processor = CLIPProcessor.from_pretrained(path, trust_remote_code=run.trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": models.base_dtype(run), "trust_remote_code": run.trust_remote_code}
    q = models.quantization_config(run)
    if q is not None:
        kwargs["quantization_config"] = q
    model = CLIPModel.from_pretrained(path, **kwargs)
    log.info("Loaded model uri=%s parameters=%d", run.model_uri, models.count_parameters(model))
    return model, processor


def adapter_config(run: StageRun) -> Any:
    """peft's LoraConfig (None for full): both towers' attention query and value projections when
    tuning.lora.targetModules is left at all-linear."""
    config = models.peft_config(run)
    if config is not None and config.target_modules == "all-linear":
        config.target_modules = set(LORA_TARGETS)
    return config


def hold_logit_scale(model: Any) -> None:
    """Hold CLIPModel's 0-dimensional temperature, logit_scale, as a 1-element tensor while training, so
    DeepSpeed's start-up broadcast (a byte view of each parameter, which a 0-dimensional tensor cannot
    give) takes it; the products it scales broadcast alike, so the loss is the same. The state dict keeps
    CLIPModel's shape (a hook reshapes it on the way out and back in), so what the stage and its checkpoints
    write still loads with CLIPModel.from_pretrained, and a resumed run loads its checkpoints."""
    scale = model.logit_scale
    model.logit_scale = torch.nn.Parameter(scale.detach().reshape(1), requires_grad=scale.requires_grad)

    def saved(module: Any, state: dict[str, Any], prefix: str, *_: Any) -> None:
        if prefix + "logit_scale" in state:
            state[prefix + "logit_scale"] = state[prefix + "logit_scale"].reshape(())

    def loaded(module: Any, state: dict[str, Any], prefix: str, *_: Any) -> None:
        if prefix + "logit_scale" in state:
            state[prefix + "logit_scale"] = state[prefix + "logit_scale"].reshape(1)

    model.register_state_dict_post_hook(saved)
    model.register_load_state_dict_pre_hook(loaded)


def max_tokens(model: Any) -> int:
    return int(model.config.text_config.max_position_embeddings)


class ContrastiveTrainer(Trainer):
    """transformers' Trainer whose contrastive loss, on several processes, is over the global batch: each
    process gathers every process's embeddings, with their gradients, as OpenCLIP does (gather_with_grad),
    so 2 processes x 32 rows train as 1 x 64. On one process it is CLIPModel's own loss."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from torch.distributed.nn.functional import all_gather

        outputs = model(**{k: v for k, v in inputs.items() if k != "return_loss"})
        image = torch.cat(all_gather(outputs.image_embeds.contiguous()))
        text = torch.cat(all_gather(outputs.text_embeds.contiguous()))
        logits = self.accelerator.unwrap_model(model).logit_scale.exp() * text @ image.T  # [text, image]
        target = torch.arange(len(text), device=logits.device)
        loss = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        return (loss, outputs) if return_outputs else loss


# --- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def embed_images(model: Any, processor: Any, rows: list[dict[str, Any]]) -> torch.Tensor:
    """Unit-length image embeddings of the rows."""
    model.eval()
    param = next(model.parameters())
    out = []
    for start in range(0, len(rows), EVAL_BATCH):
        chunk = [images.open_image(r["image"]) for r in rows[start:start + EVAL_BATCH]]
        pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
        out.append(model.get_image_features(pixel_values=pixels).pooler_output.float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def embed_texts(model: Any, processor: Any, texts: list[str]) -> torch.Tensor:
    """Unit-length text embeddings."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), EVAL_BATCH):
        enc = encode_texts(processor, texts[start:start + EVAL_BATCH], max_tokens(model)).to(device)
        out.append(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                   .pooler_output.float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def recall(image: torch.Tensor, text: torch.Tensor, captions: list[str], batch: int = RETRIEVAL_BATCH) -> dict[str, float]:
    """Recall@1 and @5 both ways over consecutive batches of `batch` rows (a last, partial batch is left
    out unless it is the only one); a retrieved row counts when its caption is the query's."""
    n = len(captions)
    starts = list(range(0, n - batch + 1, batch)) if n >= batch else [0]
    hits = {"textToImageRecallAt1": 0, "textToImageRecallAt5": 0, "imageToTextRecallAt1": 0, "imageToTextRecallAt5": 0}
    queries = 0
    for s in starts:
        e = min(s + batch, n)
        same = torch.tensor([[captions[i] == captions[j] for j in range(s, e)] for i in range(s, e)])
        sim = image[s:e] @ text[s:e].T  # [image, text]
        for way, scores in (("textToImage", sim.T), ("imageToText", sim)):
            ranked = scores.argsort(dim=-1, descending=True)
            found = same.gather(1, ranked)  # found[q, r]: the r-th retrieved row has the query's caption
            hits[f"{way}RecallAt1"] += int(found[:, 0].sum())
            hits[f"{way}RecallAt5"] += int(found[:, :5].any(dim=-1).sum())
        queries += e - s
    return {k: v / max(queries, 1) for k, v in hits.items()}


def zero_shot(model: Any, processor: Any, image: torch.Tensor, labels: list[str], names: list[str],
              template: str) -> tuple[float, list[str]]:
    """Accuracy of labelling each image with the class whose prompt is nearest, and the labels given."""
    prompts = embed_texts(model, processor, [template.replace("{label}", n) for n in names])
    predicted = [names[i] for i in (image @ prompts.T).argmax(dim=-1).tolist()]
    return sum(p == t for p, t in zip(predicted, labels)) / max(len(labels), 1), predicted


def scores(model: Any, processor: Any, rows: list[dict[str, Any]], names: list[str],
           spec: ClipSpec) -> tuple[dict[str, float], dict[str, Any]]:
    """The held-out figures, and what the model makes of the first row."""
    captions = [str(r["caption"]) for r in rows]
    image, text = embed_images(model, processor, rows), embed_texts(model, processor, captions)
    figures = recall(image, text, captions)
    batch = min(RETRIEVAL_BATCH, len(rows))
    best = int((image[0] @ text[:batch].T).argmax())
    sample: dict[str, Any] = {"caption": captions[0], "retrieved": captions[best]}
    labelled = [r for r in rows if r.get("label") is not None]
    if names and len(labelled) == len(rows):
        accuracy, predicted = zero_shot(model, processor, image, [str(r["label"]) for r in rows], names,
                                        spec.prompt_template)
        figures["zeroShotAccuracy"] = accuracy
        sample.update(label=str(rows[0]["label"]), zeroShot=predicted[0])
    return figures, sample


# --- the stage ----------------------------------------------------------------------------


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    spec = run.settings(ClipSpec)
    if run.tuning.method not in METHODS:
        raise ValueError(f"a clip stage trains with tuning.method {' or '.join(METHODS)}, not {run.tuning.method}")
    deepspeed = run.distributed.deepspeed
    if deepspeed is not None and deepspeed.zero_stage == 3 and ctx.world_size > 1:
        raise ValueError("a clip stage cannot run under DeepSpeed ZeRO-3 on several processes yet: the loss over all "
                         "processes reads the temperature (logit_scale) outside the model's forward, where ZeRO-3 "
                         "has partitioned it; set distributed.deepspeed.zeroStage to 2, or leave distributed.deepspeed "
                         "unset")

    # --- load
    rows, held_out = common.load_data(run)
    held_out = held_out[:EVAL_LIMIT]
    names = images.class_names([r["label"] for r in rows + held_out if r.get("label") is not None])

    # --- build
    models.check_tuning(run)
    model, processor = build(run, [str(r["caption"]) for r in rows])
    model = models.prepare_for_kbit(model, run)
    hold_logit_scale(model)
    lora = adapter_config(run)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    log.info("Built CLIP model trainable=%d", models.count_parameters(model, trainable=True))

    before = sample = None
    if ctx.is_main and held_out:
        before, sample = scores(model, processor, held_out, names, spec)
    common.barrier()

    args = common.training_args(
        run, ctx, TrainingArguments, evaluate=bool(run.hyperparameters.eval_steps and held_out),
        remove_unused_columns=False,  # the collator reads "image" and "caption"
        include_num_input_tokens_seen="no",
    )
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=images.ImageRows(rows, caption_of, augmentation(processor, spec)),
        eval_dataset=images.ImageRows(held_out, caption_of) if args.eval_strategy != "no" else None,
        data_collator=Collate(processor, max_tokens(model)),
        processing_class=processor,
        callbacks=ctx.callbacks,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, processor)

    after = None
    if ctx.is_main and held_out:
        from transformers import CLIPProcessor

        assert sample is not None
        trained = models.load_trained(run, ctx.out)
        after, sample_after = scores(trained, CLIPProcessor.from_pretrained(str(ctx.out)), held_out, names, spec)
        sample = {"caption": sample.pop("caption"), "before": sample,
                  "after": {k: v for k, v in sample_after.items() if k != "caption"}}
    # kubetune-serve's zero-shot labels put each candidate label into the prompt the stage was judged with
    return {**common.report(run, ctx, trainer, before, after, sample, len(held_out)),
            "zeroShot": {"promptTemplate": spec.prompt_template}}
