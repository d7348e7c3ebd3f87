"""The client detects a tampered, a truncated and a reordered reply stored in the broker.

Each test runs a real job through the real worker, copies its stored chunks
to a fresh reply subject with one change, and reads that copy with the
job's own keys.
"""

from __future__ import annotations

import pytest

from confide.clients.client import PendingJob
from confide.errors import AuthenticationError, ReplyIncompleteError, ReplyOrderError
from confide.schemas import crypto, subjects
from confide.schemas.messages import ChatMessage, GenerationParams, ReplyChunk
from confide.schemas.reply_keys import ReplyReceiver

pytestmark = pytest.mark.anyio

PARAMS = GenerationParams(max_tokens=40, temperature=0.0)


async def stored_chunks(client, job: PendingJob) -> list[bytes]:
    """Wait for the worker's final chunk, then return every stored chunk in order."""
    js = client._nc.jetstream()
    subscription = await js.subscribe(job.reply_subject, stream=subjects.REPLIES_STREAM, ordered_consumer=True)
    chunks = []
    try:
        while True:
            message = await subscription.next_msg(timeout=60)
            chunks.append(message.data)
            if ReplyChunk.from_wire(message.data).final:
                return chunks
    finally:
        await subscription.unsubscribe()


async def replay_as(client, job: PendingJob, chunks: list[bytes]) -> PendingJob:
    subject = subjects.reply_subject(crypto.random_bytes(32))
    js = client._nc.jetstream()
    for data in chunks:
        await js.publish(subject, data, stream=subjects.REPLIES_STREAM)
    return PendingJob(job.receiver, subject, job.stream_sequence)


async def run_job(client) -> tuple[PendingJob, list[bytes]]:
    job = await client.submit([ChatMessage("user", "Name three colours of the rainbow, one per line.")], PARAMS)
    chunks = await stored_chunks(client, job)
    assert len(chunks) >= 3, "the test needs at least two text chunks and a final one"
    return job, chunks


async def read_all(client, job: PendingJob) -> str:
    return "".join([event.text async for event in client.replies(job)])


async def test_untouched_copy_reads_back(client):
    """Control: the copied chunks open normally, so the failures below come from the change."""
    job, chunks = await run_job(client)

    assert await read_all(client, await replay_as(client, job, chunks))


@pytest.mark.parametrize("region", ["header", "body", "tag"])
async def test_tampered_chunk_rejected(client, region):
    """One flipped bit in a chunk's header or ciphertext fails authentication."""
    job, chunks = await run_job(client)
    chunk = ReplyChunk.from_wire(chunks[1])
    if region == "header":
        tampered = ReplyChunk(chunk.attempt, chunk.index, not chunk.final, chunk.worker_key, chunk.ciphertext)
    else:
        position = 0 if region == "body" else len(chunk.ciphertext) - 1
        flipped = bytearray(chunk.ciphertext)
        flipped[position] ^= 0x01
        tampered = ReplyChunk(chunk.attempt, chunk.index, chunk.final, chunk.worker_key, bytes(flipped))
    chunks[1] = tampered.to_wire()

    with pytest.raises(AuthenticationError):
        await read_all(client, await replay_as(client, job, chunks))


async def test_dropped_final_chunk_detected(client):
    """A reply whose final chunk never arrives ends in ReplyIncompleteError, not a silent cut."""
    job, chunks = await run_job(client)
    client.reply_timeout_s = 2

    with pytest.raises(ReplyIncompleteError):
        await read_all(client, await replay_as(client, job, chunks[:-1]))


async def test_swapped_chunks_detected(client):
    """Two chunks stored in swapped order raise ReplyOrderError."""
    job, chunks = await run_job(client)
    chunks[0], chunks[1] = chunks[1], chunks[0]

    with pytest.raises(ReplyOrderError):
        await read_all(client, await replay_as(client, job, chunks))


def twin_job(job: PendingJob) -> PendingJob:
    """Return a second handle on the same job with its own copy of the keys."""
    receiver = job.receiver
    keys = crypto.KeyPair(receiver._client_keys.secret)
    return PendingJob(ReplyReceiver(receiver._job_id, receiver._reply_token, keys), job.reply_subject, job.stream_sequence)


async def test_duplicated_chunk_ignored(client):
    """A chunk stored twice is read once: the text equals the original reply's."""
    job, chunks = await run_job(client)
    twin = twin_job(job)
    duplicated = chunks[:2] + [chunks[1]] + chunks[2:]

    original = await read_all(client, await replay_as(client, twin, chunks))
    with_duplicate = await read_all(client, await replay_as(client, job, duplicated))

    assert original
    assert with_duplicate == original
