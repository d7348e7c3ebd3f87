"""No client address reaches the broker's log, its store, or anything a worker receives.

The client connects from 127.0.0.7 through a loopback forwarder, so the
address is distinctive; the test then scans every byte the broker kept.
"""

from __future__ import annotations

from pathlib import Path

import nats
import nats.errors
import pytest

from conftest import stop
from secure_stack import CLIENT_SOURCE_ADDRESS, SourceForwarder, start_secure_broker, start_secure_worker
from confide.broker_config.logfilter import redact
from confide.clients.client import Client
from confide.schemas import subjects
from confide.schemas.messages import ChatMessage, GenerationParams

pytestmark = pytest.mark.anyio

ADDRESS = CLIENT_SOURCE_ADDRESS.encode()
QUICK = GenerationParams(max_tokens=16, temperature=0.0)


def stored_files(directory: Path) -> list[tuple[Path, bytes]]:
    return [(path, path.read_bytes()) for path in sorted(directory.rglob("*")) if path.is_file()]


@pytest.mark.parametrize(
    "line",
    [
        b"[4242] 2026/12/04 20:14:13.597100 [ERR] 127.0.0.7:45094 - cid:10 - Publish Violation",
        b"[4242] 2026/12/04 20:14:13.597100 [INF] [::1]:45094 - cid:11 - Slow Consumer Detected",
        b"[4242] 2026/12/04 20:14:13.597100 [ERR] [fe80::7%eth0]:4222 - cid:12 - TLS handshake error",
        b"Bad src Ip ::ffff:127.0.0.7",
        b"client at 2001:db8:0:0:0:0:0:7 left",
        b"leaf at 2001:db8::7 left",
    ],
)
def test_log_filter_removes_addresses(line):
    """Every IPv4 and IPv6 form nats-server writes is replaced; times, versions and ids stay."""
    redacted = redact(line)

    assert b"[address]" in redacted
    for fragment in (b"127.0.0.7", b"::1", b"fe80", b"2001:db8", b"45094"):
        assert fragment not in redacted
    if line.startswith(b"[4242]"):
        assert redacted.startswith(b"[4242] 2026/12/04 20:14:13.597100")


def test_log_filter_keeps_ordinary_lines():
    line = b"[4242] 2026/12/04 20:14:13.597100 [INF] Starting nats-server version 2.15.1 with 2 cid:3\n"

    assert redact(line) == line


@pytest.fixture(scope="module")
def address_stack(pool, tmp_path_factory):
    """A broker with authentication, one worker, and a forwarder that connects from 127.0.0.7."""
    broker = start_secure_broker(tmp_path_factory.mktemp("address-broker"))
    try:
        worker = start_secure_worker(broker, pool, tmp_path_factory.mktemp("address-worker"))
    except BaseException:
        stop(broker.process)
        raise
    forwarder = SourceForwarder(broker.port).start()
    yield broker, worker, forwarder
    forwarder.stop()
    stop(worker.process)
    stop(broker.process)


async def test_client_address_absent_from_broker(address_stack, pool):
    """After jobs, a denied subscription and a failed login from 127.0.0.7, no log or stored byte contains the address."""
    broker, worker, forwarder = address_stack
    async with await Client.connect(forwarder.url, pool.policy, reply_timeout_s=120, credentials=broker.client_credential()) as client:
        replies = [await client.ask_text([ChatMessage("user", prompt)], QUICK) for prompt in ("Name a fruit.", "Name a river.")]
        job = await client.submit([ChatMessage("user", "Name a mountain.")], QUICK)
        replies.append("".join([event.text async for event in client.replies(job)]))

        # Errors that nats-server logs with the client's address.
        await client._nc.subscribe("_INBOX.>")
        await client._nc.flush()
    with pytest.raises(nats.errors.Error):
        await nats.connect(forwarder.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=5)

    assert all(reply.strip() for reply in replies)
    assert forwarder.sources == {CLIENT_SOURCE_ADDRESS}
    stop(broker.process)

    log = broker.output()
    assert b"Subscription Violation" in log
    assert b"[address]" in log
    files = stored_files(broker.store)
    assert any(job.reply_subject.encode() in data for _, data in files), "the scan must read stored message subjects"
    for path, data in [*files, (broker.log_path, log), (worker.log_path, worker.output())]:
        assert ADDRESS not in data, f"{CLIENT_SOURCE_ADDRESS} found in {path}"


async def test_worker_receives_no_client_address(pool, tmp_path):
    """A job taken with the worker credential carries only its subject, ack subject, message id, stream name and ciphertext."""
    broker = start_secure_broker(tmp_path / "broker")
    worker = forwarder = None
    try:
        worker = start_secure_worker(broker, pool, tmp_path / "worker")
        forwarder = SourceForwarder(broker.port).start()
        async with await Client.connect(forwarder.url, pool.policy, reply_timeout_s=120, credentials=broker.client_credential()) as client:
            await client.attest()
            stop(worker.process)
            await client.submit([ChatMessage("user", "Where am I connecting from?")], QUICK)
        assert forwarder.sources == {CLIENT_SOURCE_ADDRESS}

        nc = await broker.connect_as("worker")
        try:
            consumer = await nc.jetstream().pull_subscribe_bind(durable=subjects.WORKERS_CONSUMER, stream=subjects.JOBS_STREAM)
            # A pull request of the stopped worker may hold the job until the ack wait ends.
            [message] = await consumer.fetch(1, timeout=60)
            received = b"".join(
                [message.subject.encode(), (message.reply or "").encode(), repr(message.headers).encode(), message.data]
            )
            await message.term()
        finally:
            await nc.close()
    finally:
        if forwarder is not None:
            forwarder.stop()
        if worker is not None:
            stop(worker.process)
        stop(broker.process)

    assert message.subject == subjects.JOBS_SUBJECT
    assert set(message.headers or {}) == {"Nats-Msg-Id", "Nats-Expected-Stream"}
    assert ADDRESS not in received
    assert ADDRESS not in worker.output()
