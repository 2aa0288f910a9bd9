"""One module per stage type; each has `run(run: StageRun, ctx: Context) -> dict` (see common.Context).

`launch.py` imports `kubetune_trainer.recipes.<type>` for the StageRun's type.
"""
