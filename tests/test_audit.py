"""`confide audit`: the operator's view of the broker is counts, padded sizes, random subjects and ciphertext."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import CANARY, stop
from secure_stack import start_secure_broker, start_secure_worker
from confide.clients.client import Client
from confide.schemas.messages import ChatMessage, GenerationParams

pytestmark = pytest.mark.anyio

REPLY_SUBJECT = re.compile(r"subject (confide\.reply\.v1\.[^ :]+): (\d+)")


def confide(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "confide.cli", *args], capture_output=True, text=True, timeout=120)


def stream_section(output: str, name: str) -> str:
    """Return the lines of one stream's report."""
    sections = re.split(r"^(?=stream )", output, flags=re.MULTILINE)
    [section] = [part for part in sections if part.startswith(f"stream {name}:")]
    return section


async def test_audit_shows_only_ciphertext_sizes_and_tokens(pool, tmp_path):
    """After jobs with a canary, the audit lists every stream by counts, random reply subjects and sizes, and no content."""
    broker = start_secure_broker(tmp_path / "broker")
    worker = None
    try:
        worker = start_secure_worker(broker, pool, tmp_path / "worker")
        async with await Client.connect(broker.url, pool.policy, reply_timeout_s=120, credentials=broker.client_credential()) as client:
            for prompt in (f"Repeat {CANARY}", "Name a tree."):
                await client.ask_text([ChatMessage("user", prompt)], GenerationParams(max_tokens=12, temperature=0.0))
            stop(worker.process)
            queued = await client.submit([ChatMessage("user", f"Still queued: {CANARY}")], GenerationParams(max_tokens=12))

        audited = confide("audit", "--broker", broker.url, "--creds", str(broker.credentials.operator))
        as_client = confide("audit", "--broker", broker.url, "--creds", str(broker.credentials.client))
        as_worker = confide("audit", "--broker", broker.url, "--creds", str(broker.credentials.worker))
    finally:
        if worker is not None:
            stop(worker.process)
        stop(broker.process)

    assert audited.returncode == 0, audited.stderr
    output = audited.stdout
    for stream in ("CONFIDE_JOBS", "CONFIDE_REPLIES", "KV_confide_pool", "KV_confide_log"):
        assert f"stream {stream}:" in output

    jobs = stream_section(output, "CONFIDE_JOBS")
    assert "1 messages" in jobs
    assert "Nats-Msg-Id (1)" in jobs
    assert "payloads that read as text: 0 of 1 read" in jobs
    replies = stream_section(output, "CONFIDE_REPLIES")
    subjects = dict(REPLY_SUBJECT.findall(replies))
    assert len(subjects) == 2
    assert all(re.fullmatch(r"confide\.reply\.v1\.[0-9a-f]{32}\.chunks", subject) for subject in subjects)
    assert queued.reply_subject not in subjects
    assert re.search(r"payloads that read as text: 0 of \d+ read", replies)
    assert CANARY not in output
    assert CANARY[:12] not in output

    assert as_client.returncode != 0
    assert "is the client credential" in as_client.stderr
    assert as_worker.returncode != 0
    assert "reading the broker's streams failed" in as_worker.stderr
