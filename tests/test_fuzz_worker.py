"""A short run of the fuzz runner against the suite's live worker; `make fuzz` runs the long one."""

from __future__ import annotations

import pytest

from fuzz_worker import fuzz

pytestmark = pytest.mark.anyio

SMOKE_COUNT = 300
SMOKE_SEED = 20260101


async def test_fuzz_inputs_all_rejected(broker, pool, worker):
    """300 hostile inputs leave the worker alive, each counted under a rejection reason."""
    report = await fuzz(broker.url, pool.policy, worker.stats_path, SMOKE_COUNT, SMOKE_SEED, lambda: worker.process.poll() is None)

    assert report.worker_alive, report.render()
    assert report.count == SMOKE_COUNT
    assert sum(report.rejections.values()) == SMOKE_COUNT, report.render()
    assert "replayed" in report.rejections, report.render()
    assert set(report.outcomes) <= {"completed"}, report.render()
