"""Hostile jobs published straight to the jobs subject of a live worker.

One module fixture publishes every hostile job, then a normal job, and waits
until the worker's stats file counts them all. The tests then check that the
worker is alive and replied to the normal job, that each hostile job is counted
under its reason, and that every job whose reply token the worker could read
got an authenticated error reply that the client side opens.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import anyio
import nats
import nats.js.errors
import pytest

from confide.clients.client import Client, PendingJob
from confide.errors import JobTooLargeError, ReplyError
from confide.schemas import crypto, subjects
from confide.schemas.codec import encode
from confide.schemas.messages import (
    MAX_JOB_ENVELOPE,
    PAD_BUCKETS,
    ChatMessage,
    GenerationParams,
    ReplyChunk,
)
from confide.workers.engine import DEFAULT_N_CTX
from hostile_jobs import BuiltJob, JobFactory, current_timestamp, envelope_map, payload_map

pytestmark = pytest.mark.anyio

DAY_S = 24 * 3600
STATS_WAIT_S = 60.0
NORMAL_PARAMS = GenerationParams(max_tokens=8, temperature=0.0)


def long_prompt(words: int = 4100) -> str:
    """Return about 20,000 tokens of SmolLM2 text (about 44 KB), five times the 4096-token context."""
    vocabulary = "river stone lantern orchard copper meadow violet harbor thistle signal quartz ember willow canyon pepper marble".split()
    return " ".join(f"{vocabulary[i % len(vocabulary)]}{i}" for i in range(words))


@dataclass(frozen=True)
class Case:
    """One hostile job: the reason the worker counts and the error code of its reply, if any."""

    name: str
    reason: str
    reply_code: str | None = None


# Jobs the worker terminates because it cannot read a reply token or cannot set up the reply keys.
TERMINATED = [
    Case("empty", "empty"),
    Case("not_msgpack", "malformed"),
    Case("truncated", "malformed"),
    Case("trailing_bytes", "trailing_bytes"),
    Case("oversized", "oversized"),
    Case("envelope_not_a_map", "wrong_type"),
    Case("envelope_wrong_version", "unsupported_version"),
    Case("envelope_missing_field", "missing_field"),
    Case("key_id_wrong_type", "wrong_type"),
    Case("sealed_not_a_bucket", "wrong_size"),
    Case("wrong_key_id", "unknown_key"),
    Case("sealed_to_other_key", "unseal_failed"),
    Case("sealed_random_bytes", "unseal_failed"),
    Case("payload_bad_padding", "payload_bad_padding"),
    Case("payload_not_msgpack", "payload_malformed"),
    Case("payload_wrong_version", "payload_unsupported_version"),
    Case("payload_wrong_type", "payload_wrong_type"),
    Case("payload_short_reply_token", "payload_wrong_size"),
    Case("low_order_client_key", "bad_client_key"),
]
# Jobs whose reply token the worker reads, so it sends each one an error reply.
ANSWERED = [
    Case("expired_timestamp", "expired", "expired"),
    Case("future_timestamp", "timestamp_in_future", "timestamp_in_future"),
    Case("replayed", "replayed", "replayed"),
    Case("last_message_not_user", "invalid_messages", "invalid_messages"),
    Case("blank_prompt", "empty_prompt", "empty_prompt"),
    Case("prompt_too_long", "prompt_too_long", "prompt_too_long"),
]
CASES = TERMINATED + ANSWERED


def build_hostile(factory: JobFactory, name: str, valid: BuiltJob) -> BuiltJob:
    """Return the bytes of one hostile case. `valid` is the sealed job that the replay case repeats."""
    good = factory.job()
    envelope = envelope_map(good.wire)
    request, client_secret = factory.request()
    payload = payload_map(request)
    other_pool = crypto.KeyPair.generate().public

    if name == "empty":
        return BuiltJob(b"")
    if name == "not_msgpack":
        return BuiltJob(b"\xc1 is never used by msgpack")
    if name == "truncated":
        return BuiltJob(good.wire[: len(good.wire) // 2])
    if name == "trailing_bytes":
        return BuiltJob(good.wire + b"\x00")
    if name == "oversized":
        return BuiltJob(bytes(MAX_JOB_ENVELOPE + 1))
    if name == "envelope_not_a_map":
        return BuiltJob(encode([1, "job", envelope["key_id"], envelope["sealed"]]))
    if name == "envelope_wrong_version":
        return BuiltJob(encode({**envelope, "v": 2}))
    if name == "envelope_missing_field":
        return BuiltJob(encode({key: value for key, value in envelope.items() if key != "key_id"}))
    if name == "key_id_wrong_type":
        return BuiltJob(encode({**envelope, "key_id": envelope["key_id"].hex()}))
    if name == "sealed_not_a_bucket":
        return BuiltJob(encode({**envelope, "sealed": envelope["sealed"][:-1]}))
    if name == "wrong_key_id":
        return BuiltJob(factory.seal_padded(request.to_padded(), key_id=bytes(8)))
    if name == "sealed_to_other_key":
        return BuiltJob(encode({**envelope, "sealed": crypto.seal(request.to_padded(), other_pool)}))
    if name == "sealed_random_bytes":
        return BuiltJob(encode({**envelope, "sealed": crypto.random_bytes(len(envelope["sealed"]))}))
    if name == "payload_bad_padding":
        return BuiltJob(factory.seal_padded(bytes(PAD_BUCKETS[0])))
    if name == "payload_not_msgpack":
        return BuiltJob(factory.seal_padded(crypto.pad(b"\xc1" * 10, PAD_BUCKETS[0])))
    if name == "payload_wrong_version":
        return BuiltJob(factory.seal_payload_map({**payload, "v": 2}))
    if name == "payload_wrong_type":
        return BuiltJob(factory.seal_payload_map({**payload, "messages": "hello"}))
    if name == "payload_short_reply_token":
        return BuiltJob(factory.seal_payload_map({**payload, "reply_token": payload["reply_token"][:16]}))
    if name == "low_order_client_key":
        # The all-zero point has small order, so X25519 with it gives zero and the reply keys cannot exist.
        return factory.job(client_key=bytes(32))
    if name == "expired_timestamp":
        return factory.job(timestamp=current_timestamp() - 2 * DAY_S)
    if name == "future_timestamp":
        return factory.job(timestamp=current_timestamp() + 3600)
    if name == "replayed":
        return valid
    if name == "last_message_not_user":
        return factory.job(ChatMessage("user", "Hello."), ChatMessage("assistant", "Hi."))
    if name == "blank_prompt":
        return factory.job(ChatMessage("user", " \n\t "))
    if name == "prompt_too_long":
        return factory.job(ChatMessage("user", long_prompt()))
    raise AssertionError(f"no builder for case {name}")


@dataclass
class HostileRun:
    """What the module fixture observed: stats before and after, replies, and the published jobs."""

    before: dict
    after: dict
    jobs: dict[str, BuiltJob]
    reply_errors: dict[str, ReplyError | None] = field(default_factory=dict)
    replay_original_text: str = ""
    normal_text: str = ""

    def rejected(self, reason: str) -> int:
        return self.after["rejections"].get(reason, 0) - self.before["rejections"].get(reason, 0)


def expected_rejections() -> Counter[str]:
    return Counter(case.reason for case in CASES)


async def fresh_stats(worker) -> dict:
    """Wait for the worker to rewrite its stats file once, then return its counters."""
    modified = worker.stats_path.stat().st_mtime_ns
    deadline = time.monotonic() + STATS_WAIT_S
    while worker.stats_path.stat().st_mtime_ns == modified and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    return worker.stats()


async def stats_with_rejections(worker, before: dict, expected: Counter[str]) -> dict:
    """Wait until the stats file counts every expected rejection, or return what it has at the deadline."""
    deadline = time.monotonic() + STATS_WAIT_S
    while True:
        stats = worker.stats()
        counted = {reason: stats["rejections"].get(reason, 0) - before["rejections"].get(reason, 0) for reason in expected}
        if counted == dict(expected) or time.monotonic() > deadline:
            return stats
        await anyio.sleep(0.1)


async def read_reply_error(client: Client, job: BuiltJob) -> ReplyError | None:
    """Read a job's reply as a client does, and return the ReplyError it raised or None if it completed."""
    pending = PendingJob(job.receiver(), job.reply_subject, 0)
    try:
        async for _ in client.replies(pending):
            pass
    except ReplyError as exc:
        return exc
    return None


async def stored_chunks(js, subject: str, finals: int) -> list[bytes]:
    """Return the chunks stored on a reply subject, up to and including the `finals`-th final chunk."""
    subscription = await js.subscribe(subject, stream=subjects.REPLIES_STREAM, ordered_consumer=True)
    chunks: list[bytes] = []
    try:
        while finals:
            message = await subscription.next_msg(timeout=30)
            chunks.append(message.data)
            finals -= ReplyChunk.from_wire(message.data).final
    finally:
        await subscription.unsubscribe()
    return chunks


@pytest.fixture(scope="module")
async def hostile_run(broker, pool, worker) -> HostileRun:
    async with await Client.connect(broker.url, pool.policy, reply_timeout_s=60) as client:
        attested = await client.attest()
        factory = JobFactory(attested.key, attested.key_id)
        replay_original = factory.job()
        jobs = {case.name: build_hostile(factory, case.name, replay_original) for case in CASES}
        before = await fresh_stats(worker)

        publisher = await nats.connect(broker.url)
        try:
            js = publisher.jetstream()
            await js.publish(subjects.JOBS_SUBJECT, replay_original.wire, stream=subjects.JOBS_STREAM)
            for case in CASES:
                await js.publish(subjects.JOBS_SUBJECT, jobs[case.name].wire, stream=subjects.JOBS_STREAM)

            # The worker takes one job at a time in stream order, so this
            # reply comes after every hostile job above was handled.
            normal_text = await client.ask_text([ChatMessage("user", "Name one colour.")], NORMAL_PARAMS)
            after = await stats_with_rejections(worker, before, expected_rejections())

            run = HostileRun(before, after, jobs, normal_text=normal_text)
            for case in ANSWERED:
                if case.name != "replayed":
                    run.reply_errors[case.name] = await read_reply_error(client, jobs[case.name])
            run.replay_original_text = "".join([event.text async for event in client.replies(PendingJob(replay_original.receiver(), replay_original.reply_subject, 0))])
            chunks = await stored_chunks(js, replay_original.reply_subject, finals=2)
            run.reply_errors["replayed"] = open_replay_error(replay_original, chunks)
        finally:
            await publisher.close()
    return run


def open_replay_error(original: BuiltJob, chunks: list[bytes]) -> ReplyError | None:
    """Open the chunk the worker stored after the original reply's final chunk, which is the replay's error reply."""
    first_final = next(index for index, data in enumerate(chunks) if ReplyChunk.from_wire(data).final)
    (answer,) = chunks[first_final + 1 :]
    opened = original.receiver().open(ReplyChunk.from_wire(answer))
    if opened is None or opened.body.error is None:
        return None
    return ReplyError(opened.body.error, opened.body.detail or "")


async def test_worker_survives_hostile_jobs(hostile_run, worker):
    """After every hostile job the worker process is alive and replies to a normal job."""
    assert worker.process.poll() is None
    assert hostile_run.normal_text.strip()


@pytest.mark.parametrize("reason", sorted(expected_rejections()))
async def test_rejection_counted_by_reason(hostile_run, reason):
    """The stats file counts each hostile job under its reason."""
    assert hostile_run.rejected(reason) == expected_rejections()[reason]


@pytest.mark.parametrize("case", ANSWERED, ids=lambda case: case.name)
async def test_readable_job_gets_error_reply(hostile_run, case):
    """A job whose reply token the worker read gets an authenticated error reply with its code."""
    error = hostile_run.reply_errors[case.name]

    assert error is not None, f"{case.name}: no error reply"
    assert error.code == case.reply_code
    assert error.detail


async def test_replay_leaves_original_reply_intact(hostile_run):
    """The replay's error reply follows the original's complete reply, which still reads normally."""
    assert hostile_run.replay_original_text.strip()


async def test_prompt_too_long_detail_names_limit(hostile_run):
    """The prompt_too_long reply names the model's context size, and the job fitted a padding bucket."""
    error = hostile_run.reply_errors["prompt_too_long"]
    job = hostile_run.jobs["prompt_too_long"]

    assert error is not None
    assert str(DEFAULT_N_CTX) in error.detail
    assert len(job.wire) < MAX_JOB_ENVELOPE


async def test_low_order_client_key_gets_no_reply(hostile_run, broker):
    """A job whose client key cannot form reply keys is terminated and nothing is stored for it."""
    job = hostile_run.jobs["low_order_client_key"]
    connection = await nats.connect(broker.url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await connection.jetstream().get_last_msg(subjects.REPLIES_STREAM, job.reply_subject)
    finally:
        await connection.close()


@pytest.mark.parametrize("shape", ["one_message", "many_messages"])
async def test_job_over_max_payload_raises_on_device(client, shape):
    """A job larger than the broker's max payload raises JobTooLargeError before sending, and the client still works."""
    js = client._nc.jetstream()
    before = (await js.stream_info(subjects.JOBS_STREAM)).state.last_seq
    max_payload = client._nc.max_payload
    if shape == "one_message":
        messages = [ChatMessage("user", "a" * (max_payload + 1))]
    else:
        # Each message is within the per-message limit, and together they exceed the broker's.
        piece = "a" * (max_payload // 8)
        messages = [ChatMessage("user" if i % 2 == 0 else "assistant", piece) for i in range(9)]
    prompt = messages[0].content

    with pytest.raises(JobTooLargeError) as raised:
        await client.submit(messages)

    error = raised.value
    assert error.size > error.limit
    assert error.limit <= max_payload
    assert str(error.size) in str(error)
    assert str(error.limit) in str(error)
    assert prompt[:16] not in str(error)
    assert (await js.stream_info(subjects.JOBS_STREAM)).state.last_seq == before
    assert (await client.ask_text([ChatMessage("user", "Name one colour.")], NORMAL_PARAMS)).strip()
