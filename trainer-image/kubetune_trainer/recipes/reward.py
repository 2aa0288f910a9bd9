"""kubetune-train STAGERUN.json   (a stage of type reward)

A pairwise (Bradley-Terry) reward model trained with TRL's RewardTrainer on `preference` rows
{prompt, chosen, rejected}: the input model gets a one-output score head
(AutoModelForSequenceClassification, num_labels 1) and learns to score prompt + chosen above
prompt + rejected. `reward.centerRewardsCoefficient` pulls the mean reward toward zero.

The stage folder holds the sequence-classification model (or its LoRA adapter, with the score
head saved alongside). Held-out figure: pairwise accuracy (pairwiseAccuracy), the share of
held-out pairs scored in the right order, before (random head) and after training.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import StageRun
from kubetune.api.registry import RewardSpec
from trl import RewardConfig, RewardTrainer

from kubetune_trainer import common, evals, models
from kubetune_trainer.common import Context


def run(run: StageRun, ctx: Context) -> dict[str, Any]:
    spec = run.settings(RewardSpec)

    # --- load
    rows, held_out = common.load_data(run)
    held_out = held_out[: common.EVAL_LIMIT]

    # --- build
    models.check_tuning(run)
    tokenizer = models.load_tokenizer(run)
    model = models.load_model(run, tokenizer)
    model = models.prepare_for_kbit(model, run)

    before = sample = None
    if ctx.is_main and held_out:
        accuracy, chosen, rejected = evals.pairwise_accuracy(model, tokenizer, held_out)
        before = {"pairwiseAccuracy": accuracy}
        sample = {"prompt": held_out[0]["prompt"], "chosen": held_out[0]["chosen"], "rejected": held_out[0]["rejected"],
                  "before": {"chosenScore": chosen[0], "rejectedScore": rejected[0]}}
    common.barrier()

    eval_rows = common.eval_dataset(run, held_out)
    args = common.training_args(
        run, ctx, RewardConfig, evaluate=eval_rows is not None,
        max_length=common.max_length(run),
        center_rewards_coefficient=spec.center_rewards_coefficient,
    )
    trainer = RewardTrainer(
        model=model,
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
        accuracy, chosen, rejected = evals.pairwise_accuracy(trained, tokenizer, held_out)
        after = {"pairwiseAccuracy": accuracy}
        sample["after"] = {"chosenScore": chosen[0], "rejectedScore": rejected[0]}
    return common.report(run, ctx, trainer, before, after, sample, len(held_out))
