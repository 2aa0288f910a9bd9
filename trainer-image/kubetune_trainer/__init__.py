"""kubetune's trainer: the data plane that `kubetune-train STAGERUN.json` runs in every pod.

    launch.py      entry point: read a StageRun, set up torch.distributed, run a recipe
    recipes/       one file per stage type: load, build, train, save
    models.py      load or initialise model and tokenizer, quantization, PEFT, saving
    common.py      what every recipe shares: data, TrainingArguments, DeepSpeed, checkpoints, metrics.json
    callbacks.py   progress.json and the Prometheus endpoint
    evals.py       held-out figures before and after training
    demo.py        print each stage's before/after figures from metrics.json
    data/          loading, formatting and validation of each dataset format
    storage.py     uri <-> local path
"""
