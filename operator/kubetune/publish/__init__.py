"""Serving trained models: ModelAdapters rendered into KServe InferenceServices (`kserve.py`)."""
