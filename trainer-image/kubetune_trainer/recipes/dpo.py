"""kubetune-train STAGERUN.json   (a stage of type dpo)

Direct preference optimisation with TRL's DPOTrainer on `preference` rows {prompt, chosen,
rejected}. `dpo.loss` picks TRL's loss: sigmoid (DPO), ipo (IPO, length-normalised as TRL
does) or hinge (SLiC); `dpo.beta` is beta (tau for IPO). `dpo.labelSmoothing` > 0 with the
sigmoid loss uses TRL's "robust" loss (Robust DPO, which models the same flipped-label rate;
TRL 1.x has no label smoothing on the sigmoid loss).

The reference model is the stage's input model (referenceModelUri, the previous stage's
output): a frozen copy for full fine-tuning; with LoRA the base with the adapter disabled.
Held-out figure: preference accuracy, the share of held-out pairs whose implicit reward
beta * (log pi(y|x) - log pi_ref(y|x)) is higher for the chosen answer (ties, as before any
training, count one half), plus the mean reward margin and a sample answer.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import StageRun
from kubetune.api.registry import DpoSpec
from trl import DPOConfig, DPOTrainer

from kubetune_trainer import common, evals, models
from kubetune_trainer.common import Context


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    spec = run.settings(DpoSpec)
    loss = "robust" if spec.loss == "sigmoid" and spec.label_smoothing > 0 else spec.loss

    # --- load
    rows, held_out = common.load_data(run)
    held_out = held_out[: common.EVAL_LIMIT]

    # --- build
    models.check_tuning(run)
    tokenizer = models.load_tokenizer(run)
    model = models.load_model(run, tokenizer)
    model = models.prepare_for_kbit(model, run)
    reference_uri = run.reference_model_uri or run.model_uri
    ref_model = None
    if run.tuning.method == "full":  # with LoRA the reference is the base model, adapters disabled
        ref_model = models.load_model(run, tokenizer, uri=reference_uri)

    before = ref_logps = sample = None
    if ctx.is_main and held_out:
        ref_logps = evals.preference_logps(ref_model if ref_model is not None else model, tokenizer, held_out)
        policy_logps = ref_logps if reference_uri == run.model_uri else evals.preference_logps(model, tokenizer, held_out)
        before = evals.preference_accuracy(policy_logps, ref_logps, spec.beta)
        prompt = evals.prompt_text(tokenizer, held_out[0]["prompt"])
        sample = {"prompt": prompt, "chosen": held_out[0]["chosen"], "rejected": held_out[0]["rejected"],
                  "before": evals.generate(model, tokenizer, [prompt], max_new_tokens=16)[0]}
    common.barrier()

    eval_rows = common.eval_dataset(run, held_out)
    args = common.training_args(
        run, ctx, DPOConfig, evaluate=eval_rows is not None,
        beta=spec.beta,
        loss_type=[loss],
        label_smoothing=spec.label_smoothing,
        max_length=common.max_length(run),
    )
    trainer = DPOTrainer(
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
        assert ref_logps is not None and sample is not None
        trained = models.load_trained(run, ctx.out)
        after = evals.preference_accuracy(evals.preference_logps(trained, tokenizer, held_out), ref_logps, spec.beta)
        sample["after"] = evals.generate(trained, tokenizer, [sample["prompt"]], max_new_tokens=16)[0]
    return common.report(run, ctx, trainer, before, after, sample, len(held_out))
