"""kubetune-train STAGERUN.json   (a stage of type sft)

Supervised fine-tuning with TRL's SFTTrainer on one of three formats:

    text              {text}: language modelling on every token
    promptCompletion  {prompt, completion}: the loss on the completion only (sft.completionOnlyLoss)
    messages          {messages: [{role, content, tool_calls?}]}: system, user, assistant and tool turns
                      through the chat template (sft.chatTemplate, else the model's own, else
                      kubetune's ChatML); the loss on assistant turns only (sft.completionOnlyLoss)

`hyperparameters.packing` packs examples into maxLength sequences (TRL's best-fit-decreasing,
padding-free: each example keeps its own positions). Left unset, it is on where the fast path has
FlashAttention-2 (CUDA), whose variable-length kernels keep packed examples apart exactly, and off
elsewhere. Held-out figure: exact-match accuracy of
greedy answers to held-out prompts (exactMatch), before and after, plus one sample answer.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import StageRun
from kubetune.api.registry import SftSpec
from trl import SFTConfig, SFTTrainer

from kubetune_trainer import common, evals, models
from kubetune_trainer.common import Context


def texts_of(rows: list[dict[str, Any]]) -> list[str]:
    """Plain text of each row, to train a tokenizer on when the stage builds a model from scratch."""
    out = []
    for r in rows:
        if "text" in r:
            out.append(r["text"])
        elif "messages" in r:
            out.append("\n".join(str(m.get("content") or "") for m in r["messages"]))
        else:
            out.append(f"{r['prompt']}{r['completion']}")
    return out


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    hp = run.hyperparameters
    spec = run.settings(SftSpec)
    fmt = run.dataset.format

    # --- load
    rows, held_out = common.load_data(run)

    # --- build
    models.check_tuning(run)
    tokenizer = models.load_tokenizer(run, texts_of(rows))
    new_tokens: list[str] = []
    if fmt == "messages" or spec.chat_template:
        new_tokens = models.ensure_chat_template(tokenizer, spec.chat_template)
    model = models.load_model(run, tokenizer)
    models.fit_embeddings(model, tokenizer)
    model = models.prepare_for_kbit(model, run)
    model = models.add_adapters(model, run)
    pairs = evals.prompts_and_references(held_out[: common.EVAL_LIMIT], tokenizer)

    before = answers_before = None
    if ctx.is_main and pairs:
        accuracy, answers_before = evals.exact_match(model, tokenizer, pairs)
        before = {"exactMatch": accuracy}
    common.barrier()

    eval_rows = common.eval_dataset(run, held_out)
    args = common.training_args(
        run, ctx, SFTConfig, evaluate=eval_rows is not None,
        max_length=common.max_length(run),
        packing=hp.packing if hp.packing is not None else models.fast_path(run).packing,
        completion_only_loss=spec.completion_only_loss if fmt == "promptCompletion" else None,
        assistant_only_loss=spec.completion_only_loss and fmt == "messages",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=common.to_dataset(rows),
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        peft_config=models.peft_config(run, trainable_tokens=models.new_token_rows(model, tokenizer, new_tokens)),
        callbacks=ctx.callbacks,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, tokenizer)

    after = sample = None
    if ctx.is_main and pairs:
        assert answers_before is not None
        after, sample = evals.exact_match_after(run, ctx.out, tokenizer, pairs, answers_before)
    return common.report(run, ctx, trainer, before, after, sample, len(pairs))
