"""Condition types and reasons the operator writes, each documented with its condition.

A reason is one CamelCase word a program can switch on; the condition's message is the
sentence for a person. `kubectl wait --for=condition=<Type>` and kstatus read the types.
"""

from __future__ import annotations

# --- condition types ----------------------------------------------------------------------

ACCEPTED = "Accepted"
"""FineTuneJob: the spec passed the operator's checks (beyond the CRD's) and can run."""
RUNNING = "Running"
"""FineTuneJob: a stage's PyTorchJob is running now."""
SUSPENDED = "Suspended"
"""FineTuneJob: spec.runPolicy.suspend holds the pipeline."""
SUCCEEDED = "Succeeded"
"""FineTuneJob: Unknown while the pipeline runs, True when every stage succeeded, False when it failed."""
FAILED = "Failed"
"""FineTuneJob: True when a stage failed or the job can never run."""
READY = "Ready"
"""All kinds: the object is in its desired state (job done, data set valid, model served)."""
RECONCILING = "Reconciling"
"""kstatus: the operator is working toward the desired state."""
STALLED = "Stalled"
"""kstatus: the operator cannot make progress without a change by a person."""

# --- Accepted -----------------------------------------------------------------------------

VALID = "Valid"
"""Accepted=True: the spec passed every check."""
INVALID_SPEC = "InvalidSpec"
"""Accepted=False (and Failed=True, Stalled=True): the spec can never run; the message names the field and the fix."""
PREFERENCE_DATASET_NOT_FOUND = "PreferenceDatasetNotFound"
"""Accepted=False: a stage reads a PreferenceDataset that does not exist in the job's namespace (yet)."""

# --- Running, Succeeded, Failed, Suspended, Ready of a FineTuneJob -----------------------

PENDING = "Pending"
"""Running=False, Succeeded=Unknown: the job was seen and nothing runs yet."""
STAGE_CREATED = "StageCreated"
"""Running=False, Succeeded=Unknown: a stage's PyTorchJob exists and waits for its pods."""
STAGE_RUNNING = "StageRunning"
"""Running=True, Succeeded=Unknown: a stage's pods are training."""
STAGE_RESTARTING = "StageRestarting"
"""Running=True: a stage's pods failed with a retryable exit code and are being restarted."""
STAGE_QUEUED = "StageQueued"
"""Running=False: the stage's PyTorchJob waits in its Kueue LocalQueue (not admitted yet, or evicted); the
message names the queue and gives Kueue's reason."""
STAGE_SUSPENDED = "StageSuspended"
"""Running=False: the stage's PyTorchJob is suspended (spec.runPolicy.suspend, or a queue such as Kueue before admission)."""
WAITING_FOR_DATASET = "WaitingForPreferenceDataset"
"""Running=False: the next stage waits for its PreferenceDataset to become Ready."""
STAGE_FAILED = "StageFailed"
"""Failed=True, Succeeded=False: a stage's PyTorchJob failed; the message carries its reason and message."""
PREFERENCE_DATASET_INVALID = "PreferenceDatasetInvalid"
STAGE_DELETED = "StageDeleted"
"""Failed=True, Succeeded=False: a stage's PyTorchJob was deleted before its result was recorded (a
user stopping it, or deleted while the operator was down); the stage is not silently run again."""
NAME_CONFLICT = "NameConflict"
"""Failed=True (or a Warning Event, for the ModelAdapter): an object the job would create (a stage's
PyTorchJob or StageRun ConfigMap, the ModelAdapter) exists under that name and belongs to something else."""
"""Failed=True, Succeeded=False: a stage's PreferenceDataset failed validation; the message has its first errors."""
ALL_STAGES_SUCCEEDED = "AllStagesSucceeded"
"""Succeeded=True, Ready=True: every stage succeeded."""
SUSPENDED_BY_USER = "SuspendedByUser"
"""Suspended=True: spec.runPolicy.suspend is true; no new stage starts and a running one is suspended."""
NOT_SUSPENDED = "NotSuspended"
"""Suspended=False."""
IN_PROGRESS = "InProgress"
"""Ready=False, Reconciling=True: the pipeline is on its way."""
NOT_STALLED = "NotStalled"
"""Stalled=False."""
DONE = "Done"
"""Reconciling=False: nothing more to do."""

# --- PreferenceDataset (Ready) -------------------------------------------------------------

VALIDATING = "Validating"
"""Ready=False: the validation Job runs."""
DATA_VALID = "Valid"
"""Ready=True: every row is valid; counts and checksum are in status."""
DATA_INVALID = "Invalid"
"""Ready=False: some rows are invalid; status.errors has the first ones with line numbers."""
VALIDATION_FAILED = "ValidationFailed"
"""Ready=False: the validation Job failed without a report (the data could not be read)."""

# --- ModelAdapter (Ready) ------------------------------------------------------------------

INFERENCE_SERVICE_READY = "InferenceServiceReady"
"""Ready=True: the InferenceService serving the model is Ready."""
INFERENCE_SERVICE_NOT_READY = "InferenceServiceNotReady"
"""Ready=False: the InferenceService exists and is not Ready yet (its message is copied)."""
KSERVE_MISSING = "KServeMissing"
"""Ready=False: the cluster has no serving.kserve.io InferenceService API."""
UNSUPPORTED_URI = "UnsupportedUri"
"""Ready=False: a uri KServe cannot load (file:// is local only)."""

# --- Event reasons (Kubernetes Events; not conditions) -------------------------------------

EVENT_CREATED = "Created"
"""A child object (PyTorchJob, ConfigMap, Job, InferenceService, ModelAdapter) was created."""
EVENT_STAGE_STARTED = "StageStarted"
"""A stage's pods began running."""
EVENT_STAGE_RESTARTING = "StageRestarting"
"""A stage's pods failed with a retryable exit code and are restarting."""
EVENT_STAGE_SUCCEEDED = "StageSucceeded"
"""A stage finished; the next one starts from its output."""
EVENT_STAGE_FAILED = "StageFailed"
"""A stage failed; the job fails."""
EVENT_SUCCEEDED = "Succeeded"
"""Every stage of the job succeeded."""
EVENT_SUSPENDED = "Suspended"
"""spec.runPolicy.suspend paused the job."""
EVENT_RESUMED = "Resumed"
"""The job was resumed."""
EVENT_PUBLISHED = "Published"
"""The job's result was handed to a ModelAdapter."""
EVENT_VALIDATED = "Validated"
"""A PreferenceDataset passed validation."""
EVENT_UPDATED = "Updated"
"""A child object's spec was brought up to date."""
