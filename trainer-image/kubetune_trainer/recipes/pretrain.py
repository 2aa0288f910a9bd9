"""kubetune-train STAGERUN.json   (a stage of type pretrain)

Causal language modelling on raw text (format `text`), continued from modelUri or from scratch
(modelInit: a llama, qwen2 or gpt2 config of the given sizes, and a byte-level BPE tokenizer
trained on the stage's own text when `tokenizer.train` is set).

The text is tokenized, each row closed with eos, and packed into fixed blocks of maxLength
tokens (TRL's "wrapped" packing: rows run into each other, as in GPT-style pretraining), so
`hyperparameters.packing` is implied. Training is TRL's SFTTrainer in language-modelling mode:
the loss is on every token. Held-out figure: mean next-token loss (evalLoss) before and after.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import StageRun
from trl import SFTConfig, SFTTrainer

from kubetune_trainer import common, evals, models
from kubetune_trainer.common import Context


def build_tokenizer(run: StageRun, ctx: Context, texts: list[str]) -> Any:
    """The input model's tokenizer, or one trained once (rank 0) and shared through the stage folder."""
    from transformers import AutoTokenizer

    if run.model_uri is not None or run.model_init is None or run.model_init.tokenizer is None \
            or run.model_init.tokenizer.train is None:
        return models.load_tokenizer(run, texts)
    resume = common.latest_checkpoint(ctx.out)
    if resume is not None:  # the retried attempt must use the tokenizer its checkpoint was trained with
        return AutoTokenizer.from_pretrained(str(resume))
    shared = ctx.out / "tokenizer-init"
    if ctx.is_main:
        models.load_tokenizer(run, texts).save_pretrained(str(shared))
    common.barrier()
    return AutoTokenizer.from_pretrained(str(shared))


def sample(model: Any, tokenizer: Any, text: str) -> tuple[str, str]:
    """The first few words of a held-out text and the model's greedy continuation."""
    prompt = " ".join(text.split()[:6])
    return prompt, evals.generate(model, tokenizer, [prompt], max_new_tokens=24)[0]


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    # --- load
    rows, held_out = common.load_data(run)
    texts = [r["text"] for r in rows]
    held_texts = [r["text"] for r in held_out][: common.EVAL_LIMIT]

    # --- build
    models.check_tuning(run)
    tokenizer = build_tokenizer(run, ctx, texts)
    model = models.load_model(run, tokenizer)
    models.fit_embeddings(model, tokenizer)
    model = models.prepare_for_kbit(model, run)

    before: dict[str, float] | None = None
    prompt = answer_before = None
    if ctx.is_main and held_texts:
        before = {"evalLoss": evals.eval_loss(model, tokenizer, held_texts, common.max_length(run))}
        prompt, answer_before = sample(model, tokenizer, held_texts[0])
    common.barrier()

    eval_rows = common.eval_dataset(run, [{"text": t} for t in held_texts])
    args = common.training_args(
        run, ctx, SFTConfig, evaluate=eval_rows is not None,
        dataset_text_field="text",
        max_length=common.max_length(run),
        packing=True,
        packing_strategy="wrapped",
        completion_only_loss=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=common.to_dataset([{"text": t} for t in texts]),
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        peft_config=models.peft_config(run),
        callbacks=ctx.callbacks,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, tokenizer)
    if ctx.is_main:
        import shutil

        shutil.rmtree(ctx.out / "tokenizer-init", ignore_errors=True)

    after = None
    sample_out = None
    if ctx.is_main and held_texts:
        trained = models.load_trained(run, ctx.out)
        after = {"evalLoss": evals.eval_loss(trained, tokenizer, held_texts, common.max_length(run))}
        _, answer_after = sample(trained, tokenizer, held_texts[0])
        sample_out = {"prompt": prompt, "before": answer_before, "after": answer_after}
    return common.report(run, ctx, trainer, before, after, sample_out, len(held_texts))
