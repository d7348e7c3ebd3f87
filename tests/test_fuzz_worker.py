"""The fuzz runner against the suite's live worker: 300 inputs by default, `make fuzz` for more."""

from __future__ import annotations

import os

import pytest

from fuzz_worker import COUNT_VARIABLE, SEED_VARIABLE, fuzz

pytestmark = pytest.mark.anyio

DEFAULT_COUNT = 300
DEFAULT_SEED = 20260101


async def test_fuzz_inputs_all_rejected(broker, pool, worker):
    """Hostile inputs leave the worker alive, each counted under a rejection reason."""
    count = int(os.environ.get(COUNT_VARIABLE, DEFAULT_COUNT))
    seed = int(os.environ.get(SEED_VARIABLE, DEFAULT_SEED))

    report = await fuzz(broker.url, pool.policy, worker.stats_path, count, seed, lambda: worker.process.poll() is None)
    print(f"\nseed {seed}\n{report.render()}")

    assert report.worker_alive, report.render()
    assert report.count == count
    assert sum(report.rejections.values()) == count, report.render()
    assert "replayed" in report.rejections, report.render()
    # A flood of jobs under made-up key ids outruns the worker's notice budget;
    # the suppressed notices are counted, and the jobs are still rejected.
    assert set(report.outcomes) <= {"completed", "notice_suppressed"}, report.render()
