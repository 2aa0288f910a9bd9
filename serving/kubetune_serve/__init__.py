"""kubetune-serve: kubetune's KServe model server, for every model kubetune trains.

    kubetune serve runs/demo/sft --adapter other=runs/demo/other --port 8080   (or kubetune-serve --model_dir ...)

    server.py    entry point: flags (KServe's own too), load, register the models, run KServe's ModelServer
    loading.py   what a stage folder holds (its registry head, adapter or whole model, its base), loading it
    models.py    the kserve.Model of each head: causal LM, reward model, image classifier (v1 and v2 protocols)
    openai.py    /openai/v1/models, /openai/v1/chat/completions, /openai/v1/completions
    metrics.py   kubetune_serve_* Prometheus metrics beside KServe's
    demo.py      the end of `make demo`: serve a run's last stage and ask it a held-out prompt over HTTP
"""
