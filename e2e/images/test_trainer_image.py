"""The trainer image runs the demo's pretrain stage as a pod would, and learns what a local run learns.

    make test-images

The first stage of examples/pipeline-tiny.yaml is rendered into a StageRun (as `kubetune run`
and the operator render it) and trained twice from the same data: by `kubetune-train` in this
checkout's virtualenv, and by the trainer image under `podman run` as uid 1000 with a read-only
root filesystem, the stage output a mounted host folder, /cache and /tmp the only other
writable places (the operator's emptyDirs). The held-out loss before and after training must
agree within noise: the image has the same code, but its Python packages were resolved on their
own from PyPI.
"""

from __future__ import annotations

import json

from e2e.images.conftest import UID_TRAINER as UID
from e2e.images.conftest import PretrainStage


def test_pretrain_stage_in_trainer_image_matches_local_run(pretrain_stage: PretrainStage) -> None:
    local, out = pretrain_stage.local, pretrain_stage.container
    mine = json.loads((local / "pretrain" / "metrics.json").read_text())
    theirs = json.loads((out / "pretrain" / "metrics.json").read_text())
    print(f"local: {mine['metrics']}\nimage: {theirs['metrics']}")
    assert theirs["globalStep"] == mine["globalStep"] and theirs["heldOutExamples"] == mine["heldOutExamples"]
    # the same seed, data and tokenizer: the untrained model's held-out loss is the same
    before_l, before_c = mine["before"]["evalLoss"], theirs["before"]["evalLoss"]
    assert abs(before_c - before_l) <= 0.02 * before_l, (before_l, before_c)
    # and training got as far: held-out loss within noise of the local run's, far below where it began
    after_l, after_c = mine["after"]["evalLoss"], theirs["after"]["evalLoss"]
    assert abs(after_c - after_l) <= 0.1 * after_l, (after_l, after_c)
    assert after_c < 0.5 * before_c
    # what a later stage starts from was written into the mounted output, owned by the pod's user
    written = {p.name for p in (out / "pretrain").iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json"} <= written, written
    assert (out / "pretrain" / "model.safetensors").stat().st_uid == UID
