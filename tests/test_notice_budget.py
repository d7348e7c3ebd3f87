"""Unit tests of NoticeBudget, which caps the key notices a worker files (workers/job.py)."""

from __future__ import annotations

from confide.workers.job import NoticeBudget


def test_notice_budget_allows_burst_then_refuses():
    """A burst up to the limit passes at once; the next notice in the same instant is refused."""
    budget = NoticeBudget(burst=3, window_s=30)

    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_notice_budget_refills_over_window():
    """Spent notices come back evenly: one per window_s / burst seconds, never above the burst."""
    budget = NoticeBudget(burst=3, window_s=30)
    for _ in range(3):
        budget.take(100.0)

    assert not budget.take(109.0)
    assert budget.take(110.0)
    assert not budget.take(110.0)
    assert [budget.take(1000.0) for _ in range(4)] == [True, True, True, False]
