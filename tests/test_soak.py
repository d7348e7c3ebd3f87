"""Long runs kept out of the default suite: `make soak` runs them."""

from __future__ import annotations

import json

import pytest

from test_batch import open_outbox, write_input
from confide.clients.batch import BatchRunner, BatchSettings, read_input, write_results
from confide.clients.outbox import JobState
from confide.schemas.messages import GenerationParams

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SOAK_JOBS = 1000


async def test_thousand_job_batch_complete(client, tmp_path):
    """A 1,000-job batch ends with exactly one result per input line, in input order."""
    rows = [{"id": f"job-{n}", "prompt": f"Reply with one word about the number {n}."} for n in range(SOAK_JOBS)]
    batch_id, parsed = read_input(write_input(tmp_path / "in.jsonl", rows))
    outbox = open_outbox(tmp_path)
    outbox.add_batch(batch_id, str(tmp_path / "out.jsonl"), parsed)
    runner = BatchRunner(client, outbox, BatchSettings(GenerationParams(max_tokens=4, temperature=0.0), first_chunk_timeout_s=3600))

    await runner.submit(batch_id)
    await runner.collect(batch_id)
    written = write_results(outbox, batch_id, tmp_path / "out.jsonl")

    counts = outbox.counts(batch_id)
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert written == SOAK_JOBS
    assert counts[JobState.DONE] == SOAK_JOBS
    assert [r["id"] for r in results] == [row["id"] for row in rows]
    assert all("reply" in r for r in results)
