"""kubetune-train STAGERUN.json   (a stage of type imageClassification)

Image classification with transformers' Trainer on `imageLabel` rows {image, label} (JSONL, CSV,
Parquet, a datasets folder, or the ImageFolder layout; see data/images.py):

    model       AutoModelForImageClassification from model.uri (a Hugging Face classifier or a
                previous stage) with its AutoImageProcessor, or built from model.init (vit,
                convnext or resnet at small sizes) with the processor of its architecture. The head
                has one output per class of the data, named in the config (id2label/label2id); a
                model whose labels are the data's keeps its head, any other gets a new one.
    tuning      full; lora and qlora (peft): by default LoRA on the attention's query and value
                (vit and its kin), the pointwise layers (convnext) or the convolutions (resnet),
                with the classifier trained whole as `modules_to_save`
    augment     training images only: torchvision v2 random resized crop (imageClassification.
                cropScale) and left-right flip (imageClassification.horizontalFlip); held-out
                images are only resized and normalised by the image processor, as when served

The stage folder holds the model (or adapter, and `merged/` for the next stage) with its image
processor, so `AutoModelForImageClassification.from_pretrained` and `AutoImageProcessor.
from_pretrained` load it, and `confusion_matrix.png` of the held-out images after training.
Held-out figures, before and after: accuracy (the primary one) and top5Accuracy.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from kubetune.api import StageRun
from kubetune.api.registry import ARCHITECTURES, ImageClassificationSpec
from transformers import AutoConfig, AutoImageProcessor, Trainer, TrainingArguments

from kubetune_trainer import common, models, storage
from kubetune_trainer.common import Context
from kubetune_trainer.data import images

log = logging.getLogger("kubetune_trainer")

EVAL_LIMIT = 5000  # held-out images scored before and after (a forward pass each: cheap)
EVAL_BATCH = 64
CONFUSION_PNG = "confusion_matrix.png"
METHODS = ("full", "lora", "qlora")
# LoRA's default modules per model type, when tuning.lora.targetModules is left at all-linear
LORA_TARGETS: dict[str, list[str]] = {
    "convnext": ["pwconv1", "pwconv2"],
    "resnet": ["convolution"],
}
# the attention's query and value projections, as transformers names them (ViT: q_proj/v_proj since
# transformers 5; query/value in DeiT, BEiT, Swin, DINOv2 and older ViTs)
ATTENTION_TARGETS = (["q_proj", "v_proj"], ["query", "value"])
HEAD = "classifier"  # the head of transformers' image classifiers


# --- data ---------------------------------------------------------------------------------


def label_ids(label2id: dict[str, int]) -> Any:
    """The row's class id, for images.ImageRows."""
    return lambda row: {"label": label2id[str(row["label"])]}


class Collate:
    """A batch through the image processor (resize, rescale, normalise): pixel_values and labels."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = self.processor(images=[b["image"] for b in batch], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([b["label"] for b in batch])}


def _size(size: Any, key: str) -> int | None:
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value else None


def image_side(processor: Any) -> int:
    """The side of the square the processor hands the model (its crop when it crops)."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None and _size(crop, "height"):
        return _size(crop, "height") or 0
    size = processor.size
    side = _size(size, "height") or _size(size, "shortest_edge")
    if side is None:
        raise ValueError(f"cannot tell the image size of {type(processor).__name__} (size {size}); "
                         "use a model whose image processor sets size.height or size.shortest_edge")
    return side


def augmentation(processor: Any, spec: ImageClassificationSpec) -> Any:
    """torchvision v2 transforms on PIL training images: random resized crop, then a flip."""
    from torchvision.transforms import v2

    side = image_side(processor)
    steps: list[Any] = [v2.RandomResizedCrop((side, side), scale=(spec.crop_scale, 1.0), antialias=True)]
    if spec.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def check_classes(rows: list[dict[str, Any]], held_out: list[dict[str, Any]]) -> list[str]:
    """The class names of the data (training classes first in id order); ValueError when a class
    has fewer than 2 training examples once the held-out rows are set aside."""
    counts = Counter(str(r["label"]) for r in rows)
    thin = sorted(c for c, n in counts.items() if n < images.MIN_EXAMPLES_PER_CLASS)
    if thin:
        raise ValueError(
            f"classes {', '.join(thin)} have fewer than {images.MIN_EXAMPLES_PER_CLASS} training examples after the "
            "held-out rows are set aside; add examples, lower dataset.validationFraction or give a validationUri"
        )
    unseen = sorted({str(r["label"]) for r in held_out} - set(counts))
    if unseen:
        log.warning("Found held-out classes with no training example classes=%s; they cannot be learned", unseen)
    return images.class_names([r["label"] for r in rows + held_out])


# --- model --------------------------------------------------------------------------------


def label_kwargs(names: list[str]) -> dict[str, Any]:
    """The config's class names (the number of labels follows from id2label)."""
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def model_labels(run: StageRun, names: list[str]) -> list[str]:
    """The classes in head order: the model's own order when its labels are the data's, else the data's."""
    if run.model_uri is None:
        return names
    config = AutoConfig.from_pretrained(str(storage.local_path(run.model_uri)), trust_remote_code=run.trust_remote_code)
    own = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else []
    return own if sorted(own) == sorted(names) else names


def load_classifier(run: StageRun, path: str, names: list[str], quantize: bool = False, dtype: Any = None) -> Any:
    """A classifier from `path` with a head for `names`: kept when its labels are those, new otherwise.
    dtype: of the weights (default: models.base_dtype)."""
    cls = models.head_of(run).cls()
    config = AutoConfig.from_pretrained(path, trust_remote_code=run.trust_remote_code)
    own = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else []
    kwargs: dict[str, Any] = {"dtype": dtype or models.base_dtype(run), "trust_remote_code": run.trust_remote_code}
    if own != names:
        kwargs.update(label_kwargs(names), ignore_mismatched_sizes=True)
    q = models.quantization_config(run) if quantize else None
    if q is not None:
        q.llm_int8_skip_modules = [HEAD]  # the new head trains whole, in full precision
        kwargs["quantization_config"] = q
    model = cls.from_pretrained(path, **kwargs)
    if own != names and len(own) == len(names):  # same size, other classes: the old head means nothing
        head = getattr(model, HEAD, None)
        for m in head.modules() if head is not None else ():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


def build(run: StageRun, names: list[str]) -> tuple[Any, Any]:
    """(model, image processor): from run.modelUri, or built from run.modelInit."""
    if run.model_uri is None:
        init = models.init_of(run)
        if ARCHITECTURES[init.architecture] != "image":
            raise ValueError(f"model.init.architecture {init.architecture} is a text model; an imageClassification "
                             "stage builds vit, convnext or resnet")
        model = models.head_of(run).cls().from_config(models.vision_config(init, names))
        log.info("Initialised model architecture=%s parameters=%d", init.architecture, models.count_parameters(model))
        return model, models.image_processor(init)
    path = str(storage.local_path(run.model_uri))
    processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=run.trust_remote_code)
    model = load_classifier(run, path, names, quantize=True)
    log.info("Loaded model uri=%s classes=%d parameters=%d", run.model_uri, len(names), models.count_parameters(model))
    return model, processor


def adapter_config(run: StageRun, model: Any) -> Any:
    """peft's LoraConfig for lora and qlora (None for full): the model type's default targets when
    tuning.lora.targetModules is left at all-linear, and the classifier trained whole."""
    config = models.peft_config(run)
    if config is None:
        return None
    if config.target_modules == "all-linear":
        config.target_modules = set(default_targets(model))
    config.modules_to_save = [HEAD]
    return config


def default_targets(model: Any) -> list[str]:
    """LoRA's modules for the model when tuning.lora.targetModules is left at all-linear."""
    if model.config.model_type in LORA_TARGETS:
        return LORA_TARGETS[model.config.model_type]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in ATTENTION_TARGETS:
        if set(pair) <= names:
            return pair
    raise ValueError(f"kubetune has no default LoRA modules for {model.config.model_type} models; "
                     "list them in tuning.lora.targetModules")


# --- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def predict(model: Any, processor: Any, rows: list[dict[str, Any]]) -> tuple[list[int], list[list[int]]]:
    """The top class and the top 5 classes of each row's image."""
    model.eval()
    param = next(model.parameters())
    top1: list[int] = []
    top5: list[list[int]] = []
    for start in range(0, len(rows), EVAL_BATCH):
        chunk = [images.open_image(r["image"]) for r in rows[start:start + EVAL_BATCH]]
        pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
        logits = model(pixel_values=pixels).logits.float()
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += best[:, 0].tolist()
        top5 += best.tolist()
    return top1, top5


def scores(truth: list[int], top1: list[int], top5: list[list[int]]) -> dict[str, float]:
    n = max(len(truth), 1)
    return {
        "accuracy": sum(t == p for t, p in zip(truth, top1)) / n,
        "top5Accuracy": sum(t in best for t, best in zip(truth, top5)) / n,
    }


def confusion(truth: list[int], predicted: list[int], k: int) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(truth, predicted):
        matrix[t][p] += 1
    return matrix


def draw_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str) -> None:
    """A PNG of the confusion matrix: rows true classes, columns predicted, shaded by each row's share."""
    from PIL import Image, ImageDraw, ImageFont

    k = len(names)
    cell = max(2, min(48, 720 // max(k, 1)))
    font = ImageFont.load_default(size=max(9, min(14, cell // 2)))
    show_names = cell >= 12
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max((draw.textlength(n[:16], font=font) for n in names), default=0) if show_names else 0
    left, top = int(name_w) + 36, int(name_w) + 56
    width, height = max(left + k * cell + 16, 260), top + k * cell + 16
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=font)
    draw.text((left, 24), "predicted ->", fill="black", font=font)
    draw.text((4, top - 16), "true", fill="black", font=font)
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        y = top + i * cell
        for j, count in enumerate(row):
            share = count / total
            x = left + j * cell
            shade = (int(255 - share * 222), int(255 - share * 153), int(255 - share * 83))  # white -> blue
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=shade, outline=(220, 220, 220))
            if count and cell >= 20:
                draw.text((x + cell / 2, y + cell / 2), str(count), fill="white" if share > 0.5 else "black",
                          font=font, anchor="mm")
    if show_names:
        for i, name in enumerate(names):
            draw.text((left - 4, top + i * cell + cell / 2), name[:16], fill="black", font=font, anchor="rm")
            label = Image.new("RGBA", (int(name_w) + 4, cell), (255, 255, 255, 0))
            ImageDraw.Draw(label).text((0, cell / 2), name[:16], fill="black", font=font, anchor="lm")
            rotated = label.rotate(90, expand=True)
            image.paste(rotated, (left + i * cell, top - 4 - rotated.height), rotated)
    image.save(path)


# --- the stage ----------------------------------------------------------------------------


def base_loader(run: StageRun, names: list[str]) -> models.BaseLoader:
    """How the shared save and reload (common.save, models.load_trained) load the base under an adapter: with
    the head for `names` the adapter's classifier was trained on."""
    return lambda path, dtype: load_classifier(run, path, names, dtype=dtype)


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    spec = run.settings(ImageClassificationSpec)
    if run.tuning.method not in METHODS:
        raise ValueError(f"an imageClassification stage trains with tuning.method {', '.join(METHODS)}, "
                         f"not {run.tuning.method}")

    # --- load
    rows, held_out = common.load_data(run)
    names = check_classes(rows, held_out)
    held_out = held_out[:EVAL_LIMIT]

    # --- build
    models.check_tuning(run)
    names = model_labels(run, names)
    label2id = {n: i for i, n in enumerate(names)}
    model, processor = build(run, names)
    model = models.prepare_for_kbit(model, run)
    # Each process's loss is the mean over its own images, which DDP and DeepSpeed average: the global mean.
    # Trainer would otherwise take a forward with **kwargs (ResNet's) for one that sums over the global batch,
    # and multiply the loss by the number of processes, which ResNet's mean does not undo.
    model.accepts_loss_kwargs = False
    lora = adapter_config(run, model)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    log.info("Built classifier classes=%d trainable=%d", len(names), models.count_parameters(model, trainable=True))
    truth = [label2id[str(r["label"])] for r in held_out]

    before = sample = None
    if ctx.is_main and held_out:
        top1, top5 = predict(model, processor, held_out)
        before = scores(truth, top1, top5)
        sample = {"label": names[truth[0]], "before": names[top1[0]]}
    common.barrier()

    args = common.training_args(
        run, ctx, TrainingArguments, evaluate=bool(run.hyperparameters.eval_steps and held_out),
        remove_unused_columns=False,  # the collator reads "image"
        include_num_input_tokens_seen="no",  # pixels are no tokens
        label_names=["labels"],
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=images.ImageRows(rows, label_ids(label2id), augmentation(processor, spec)),
        eval_dataset=images.ImageRows(held_out, label_ids(label2id)) if args.eval_strategy != "no" else None,
        data_collator=Collate(processor),
        processing_class=processor,
        callbacks=ctx.callbacks,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, processor, base_loader(run, names))

    after = None
    if ctx.is_main and held_out:
        assert sample is not None
        trained = models.load_trained(run, ctx.out, base_loader(run, names))
        top1, top5 = predict(trained, AutoImageProcessor.from_pretrained(str(ctx.out)), held_out)
        after = scores(truth, top1, top5)
        sample["after"] = names[top1[0]]
        draw_confusion(confusion(truth, top1, len(names)), names, ctx.out / CONFUSION_PNG,
                       f"{run.stage}: held-out accuracy {after['accuracy']:.3f} ({len(held_out)} images)")
    return common.report(run, ctx, trainer, before, after, sample, len(held_out))
