"""No prompt, reply or reply token reaches any stored broker byte or any log."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CANARY
from confide.schemas.messages import ChatMessage, GenerationParams

pytestmark = pytest.mark.anyio


def stored_bytes(directory: Path) -> list[tuple[Path, bytes]]:
    """Every file under the broker's JetStream store: streams, buckets and consumer state."""
    return [(path, path.read_bytes()) for path in sorted(directory.rglob("*")) if path.is_file()]


async def test_canary_absent_from_broker_store_and_logs(client, broker, worker):
    """A canary in the prompt and reply appears in no stored byte and no process output."""
    prompt = f"Repeat this code word three times: {CANARY} नमस्ते {CANARY}"
    job = await client.submit([ChatMessage("user", prompt)], GenerationParams(max_tokens=80, temperature=0.0))
    reply_token = job.receiver._reply_token
    reply = "".join([event.text async for event in client.replies(job)])
    await client._nc.flush()

    needles = {
        "canary": CANARY.encode(),
        "canary fragment": CANARY[:16].encode(),
        "hindi prompt text": "नमस्ते".encode(),
        "reply token": reply_token,
        "reply token hex": reply_token.hex().encode(),
    }
    if len(reply.strip()) >= 12:
        needles["reply text"] = reply.strip()[:12].encode()

    files = stored_bytes(broker.directory / "jetstream")
    assert files, "the broker stored nothing, so the check would prove nothing"
    # The reply subject is stored with every chunk: finding it shows the scan reads message data.
    assert any(job.reply_subject.encode() in data for _, data in files)
    sources = files + [(broker.log_path, broker.output()), (worker.log_path, worker.output())]
    for name, needle in needles.items():
        for path, data in sources:
            assert needle not in data, f"{name} found in {path}"


async def test_worker_log_has_job_events_without_content(client, worker):
    """The worker writes one completion line per job, with counts and durations only."""
    await client.ask_text([ChatMessage("user", f"Say {CANARY}")], GenerationParams(max_tokens=8, temperature=0.0))

    log = worker.output().decode("utf-8")
    completed = [line for line in log.splitlines() if "job completed" in line]
    assert completed
    assert all("completion_tokens=" in line for line in completed)
    assert CANARY not in log
