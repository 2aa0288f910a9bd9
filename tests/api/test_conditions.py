"""Conditions behave like apimachinery's SetStatusCondition."""

from __future__ import annotations

import time

from kubetune.api import find_condition, is_true, set_condition


def test_transition_time_moves_only_when_status_changes() -> None:
    conds = set_condition([], "Running", "True", "StageRunning", "Stage sft is running.", 3)
    first = find_condition(conds, "Running")
    assert first is not None and first["observedGeneration"] == 3
    time.sleep(1.1)
    conds = set_condition(conds, "Running", "True", "StageRunning", "Stage dpo is running.", 3)
    same = find_condition(conds, "Running")
    assert same is not None
    assert same["lastTransitionTime"] == first["lastTransitionTime"] and same["message"] == "Stage dpo is running."
    conds = set_condition(conds, "Running", "False", "Succeeded", "All stages succeeded.", 3)
    moved = find_condition(conds, "Running")
    assert moved is not None and moved["lastTransitionTime"] != first["lastTransitionTime"]
    assert not is_true(conds, "Running") and len(conds) == 1


def test_set_condition_returns_a_new_list() -> None:
    original = [{"type": "Ready", "status": "False", "reason": "Pending", "message": "", "lastTransitionTime": "x"}]
    updated = set_condition(original, "Ready", "True", "Succeeded")
    assert original[0]["status"] == "False" and is_true(updated, "Ready")
