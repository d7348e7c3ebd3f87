"""Unit tests of ReplayGuard, the worker's memory of job ids (workers/job.py).

The live worker's error reply to a replayed job is tested in test_hostile_input.py.
"""

from __future__ import annotations

import logging

import pytest

from confide.workers.job import ReplayGuard

NOW = 1_750_000_000.0


def job_id(number: int) -> bytes:
    return number.to_bytes(16, "big")


def test_replay_guard_same_sequence_is_a_redelivery():
    """The same job id under the same stream sequence passes again: JetStream redelivered it."""
    guard = ReplayGuard(window_s=60)

    assert guard.check_and_remember(job_id(1), 10, NOW)
    assert guard.check_and_remember(job_id(1), 10, NOW + 1)


def test_replay_guard_other_sequence_is_a_replay():
    """The same job id published again, under another sequence, is refused within the window."""
    guard = ReplayGuard(window_s=60)
    guard.check_and_remember(job_id(1), 10, NOW)

    assert not guard.check_and_remember(job_id(1), 11, NOW + 59)


def test_replay_guard_forgets_after_the_window():
    """After the window an id is forgotten; the job's own expiry check refuses it by then."""
    guard = ReplayGuard(window_s=60)
    guard.check_and_remember(job_id(1), 10, NOW)

    assert guard.check_and_remember(job_id(1), 11, NOW + 61)
    assert len(guard) == 1


def test_replay_guard_full_forgets_oldest_and_counts(caplog):
    """At the cap the oldest id goes first, the newest are still caught, and the loss is counted and logged."""
    guard = ReplayGuard(window_s=3600, max_entries=3)
    for number in range(5):
        with caplog.at_level(logging.WARNING, logger="confide.worker.job"):
            assert guard.check_and_remember(job_id(number), number, NOW + number)

    assert len(guard) == 3
    assert guard.evicted == 2
    assert guard.check_and_remember(job_id(0), 100, NOW + 10), "the oldest id was forgotten"
    assert not guard.check_and_remember(job_id(4), 100, NOW + 10), "a recent id is still caught"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "replay memory is full at 3 job ids" in warnings[0]


def test_replay_guard_rejects_empty_cap():
    """A cap below one id is a configuration error."""
    with pytest.raises(ValueError, match="max_entries must be at least 1"):
        ReplayGuard(window_s=60, max_entries=0)
