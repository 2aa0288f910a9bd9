"""The operator benchmark's wait between phases (bench/operator_scale.settle): a phase starts only
once the training-operator has sent what the phase before left it to send. The benchmark itself
runs at N = 3 in e2e/operator/test_e2e_bench_operator_scale.py, against a real cluster."""

from __future__ import annotations

import itertools

from bench import operator_scale


def metrics_text(requests: int) -> str:
    """The lines of the training-operator's /metrics that settle reads (controller-runtime's format)."""
    return (f'rest_client_requests_total{{code="201",host="127.0.0.1:6443",method="POST"}} {requests - 2}\n'
            f'rest_client_requests_total{{code="200",host="127.0.0.1:6443",method="PUT"}} 2\n')


def test_settle_waits_until_the_training_operator_sends_nothing_for_the_quiet_time() -> None:
    counts = itertools.chain([10, 12, 15], itertools.repeat(15))  # three polls still writing, then quiet
    waited = operator_scale.settle(lambda: metrics_text(next(counts)), quiet=1.0, timeout=30)
    assert 0.9 <= waited <= 2.5  # its last request came two polls (0.5 s each) after the call


def test_settle_gives_up_after_its_timeout_on_a_training_operator_that_never_stops() -> None:
    counts = itertools.count(10)
    said: list[str] = []
    waited = operator_scale.settle(lambda: metrics_text(next(counts)), quiet=1.0, timeout=1.5, log=said.append)
    assert waited >= 1.0 and said and "still sending requests" in said[0]
