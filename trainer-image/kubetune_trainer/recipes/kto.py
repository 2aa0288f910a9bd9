"""kubetune-train STAGERUN.json   (a stage of type kto)

Kahneman-Tversky optimisation with TRL's KTOTrainer on `unpairedPreference` rows {prompt,
completion, label} (label true: desirable). `preference` rows {prompt, chosen, rejected} are
unpaired first: each pair gives a desirable and an undesirable row. `kto.beta`,
`kto.desirableWeight` and `kto.undesirableWeight` are TRL's beta and weights. KTO estimates
its KL term from mismatched pairs inside a batch, so batchSize must be at least 2.

The reference model is the stage's input model (a frozen copy for full fine-tuning; the base
with the adapter disabled for LoRA). Held-out figure: mean log-probability of the desirable
completions (desirableLogProb, which KTO raises) and of the undesirable ones, before and after.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import StageRun
from kubetune.api.registry import KtoSpec
from trl import KTOConfig, KTOTrainer

from kubetune_trainer import common, evals, models
from kubetune_trainer.common import Context


def unpair(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """unpairedPreference rows from preference rows (unpairedPreference rows pass through)."""
    if not rows or "chosen" not in rows[0]:
        return rows
    out = []
    for r in rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


def logprobs(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean log p(completion | prompt) of the desirable and the undesirable held-out rows."""
    prompts = [evals.prompt_text(tokenizer, r["prompt"]) for r in rows]
    logps = evals.completion_logps(model, tokenizer, prompts, [evals.completion_text(r["completion"]) for r in rows])
    good = [lp for lp, r in zip(logps, rows, strict=True) if r["label"]]
    bad = [lp for lp, r in zip(logps, rows, strict=True) if not r["label"]]
    figures = {}
    if good:
        figures["desirableLogProb"] = sum(good) / len(good)
    if bad:
        figures["undesirableLogProb"] = sum(bad) / len(bad)
    return figures


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    hp = run.hyperparameters
    spec = run.settings(KtoSpec)
    if hp.batch_size < 2:
        raise ValueError("kto estimates its KL term within a batch; set hyperparameters.batchSize to 2 or more")

    # --- load
    rows, held_out = common.load_data(run)
    rows, held_out = unpair(rows), unpair(held_out)[: common.EVAL_LIMIT]

    # --- build
    models.check_tuning(run)
    tokenizer = models.load_tokenizer(run)
    model = models.load_model(run, tokenizer)
    model = models.prepare_for_kbit(model, run)
    ref_model = None
    if run.tuning.method == "full":
        ref_model = models.load_model(run, tokenizer, uri=run.reference_model_uri or run.model_uri)

    before = sample = None
    if ctx.is_main and held_out:
        before = logprobs(model, tokenizer, held_out)
        prompt = evals.prompt_text(tokenizer, held_out[0]["prompt"])
        sample = {"prompt": prompt, "before": evals.generate(model, tokenizer, [prompt], max_new_tokens=16)[0]}
    common.barrier()

    eval_rows = common.eval_dataset(run, held_out)
    args = common.training_args(
        run, ctx, KTOConfig, evaluate=eval_rows is not None,
        beta=spec.beta,
        desirable_weight=spec.desirable_weight,
        undesirable_weight=spec.undesirable_weight,
        max_length=common.max_length(run),
    )
    trainer = KTOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=common.to_dataset(rows),
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        peft_config=models.peft_config(run),
        callbacks=ctx.callbacks,
    )

    # --- train
    common.train(trainer, ctx)

    # --- save
    common.save(trainer, run, ctx, tokenizer)

    after = None
    if ctx.is_main and held_out:
        assert sample is not None
        trained = models.load_trained(run, ctx.out)
        after = logprobs(trained, tokenizer, held_out)
        sample["after"] = evals.generate(trained, tokenizer, [sample["prompt"]], max_new_tokens=16)[0]
    return common.report(run, ctx, trainer, before, after, sample, len(held_out))
