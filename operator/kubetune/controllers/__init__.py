"""kopf handlers, one module per CRD. Importing this package registers them with kopf.

    finetunejob.py        FineTuneJob: stages as PyTorchJobs, chained by their conditions
    preferencedataset.py  PreferenceDataset: a validation Job, its report in status
    modeladapter.py       ModelAdapter: a KServe InferenceService, shared per base model
"""

from kubetune.controllers import finetunejob, modeladapter, preferencedataset

__all__ = ["finetunejob", "modeladapter", "preferencedataset"]
