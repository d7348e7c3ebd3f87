"""Batch jobs through the encrypted outbox, on a real broker, worker and model."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio
import pytest

from conftest import CANARY, start_broker, start_worker, stop
from confide.clients.batch import BatchRunner, BatchSettings, read_input, write_results
from confide.clients.client import Client
from confide.clients.keysource import SoftwareKeyFile
from confide.clients.outbox import OUTBOX_PERSON_CONTEXT, JobState, Outbox, OutboxError
from confide.schemas import subjects
from confide.schemas.messages import GenerationParams

pytestmark = pytest.mark.anyio

QUICK = BatchSettings(GenerationParams(max_tokens=16, temperature=0.0))


def write_input(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def open_outbox(directory: Path) -> Outbox:
    key = SoftwareKeyFile(directory / "device.key").derive(OUTBOX_PERSON_CONTEXT)
    return Outbox(directory / "outbox.sqlite3", key)


async def jobs_last_sequence(client: Client) -> int:
    return (await client._nc.jetstream().stream_info(subjects.JOBS_STREAM)).state.last_seq


async def test_batch_results_in_input_order(client, prompts, tmp_path):
    """Results keep the input's order and ids; the empty prompt fails without being sent."""
    rows = [{"id": key, "prompt": prompts[key]["prompt"]} for key in ("p10", "p35", "p24", "p31")]
    batch_id, parsed = read_input(write_input(tmp_path / "in.jsonl", rows))
    outbox = open_outbox(tmp_path)
    outbox.add_batch(batch_id, str(tmp_path / "out.jsonl"), parsed)
    runner = BatchRunner(client, outbox, QUICK)

    before = await jobs_last_sequence(client)
    await runner.submit(batch_id)
    assert await jobs_last_sequence(client) == before + 3
    await runner.collect(batch_id)
    write_results(outbox, batch_id, tmp_path / "out.jsonl")

    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in results] == ["p10", "p35", "p24", "p31"]
    assert results[1]["error"]["code"] == "empty_prompt"
    for result in (results[0], results[2], results[3]):
        assert result["reply"]
        assert "\ufffd" not in result["reply"]
    assert outbox.counts(batch_id)[JobState.DONE] == 3


async def test_batch_resume_does_not_resubmit(client, tmp_path):
    """A second run after the submit phase publishes nothing and still collects every reply."""
    rows = [{"prompt": f"Count to {n}."} for n in range(3, 7)]
    batch_id, parsed = read_input(write_input(tmp_path / "in.jsonl", rows))
    outbox = open_outbox(tmp_path)
    outbox.add_batch(batch_id, str(tmp_path / "out.jsonl"), parsed)
    await BatchRunner(client, outbox, QUICK).submit(batch_id)
    outbox.close()
    after_first_run = await jobs_last_sequence(client)

    reopened = open_outbox(tmp_path)
    assert reopened.add_batch(batch_id, str(tmp_path / "out.jsonl"), parsed) == 0
    runner = BatchRunner(client, reopened, QUICK)
    await runner.submit(batch_id)
    await runner.collect(batch_id)

    assert await jobs_last_sequence(client) == after_first_run
    assert reopened.counts(batch_id)[JobState.DONE] == 4


async def test_republished_job_deduplicated(client, tmp_path):
    """A job whose acceptance was not recorded is republished with its message id and stored once."""
    from confide.schemas.messages import ChatMessage

    prepared = await client.prepare([ChatMessage("user", "Say hello.")], GenerationParams(max_tokens=4))
    first = await client.publish(prepared)
    second = await client.publish(prepared)

    assert second == first


async def test_outbox_encrypted_at_rest_and_keys_erased(client, tmp_path):
    """The outbox file contains no prompt or reply bytes, and finished jobs keep no keys."""
    rows = [{"id": "secret", "prompt": f"Repeat {CANARY} once."}]
    batch_id, parsed = read_input(write_input(tmp_path / "in.jsonl", rows))
    outbox = open_outbox(tmp_path)
    outbox.add_batch(batch_id, str(tmp_path / "out.jsonl"), parsed)
    runner = BatchRunner(client, outbox, QUICK)
    await runner.submit(batch_id)
    await runner.collect(batch_id)
    outbox.close()

    database = sqlite3.connect(tmp_path / "outbox.sqlite3")
    database.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    database.close()
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("outbox.sqlite3*"))
    assert CANARY.encode() not in stored
    assert b"secret" not in stored

    reopened = open_outbox(tmp_path)
    [job] = list(reopened.jobs(batch_id))
    assert job.state is JobState.DONE
    assert job.secrets is None
    assert job.result["reply"]


async def test_outbox_wrong_device_key_rejected(tmp_path):
    """An outbox opened with another device key raises OutboxError, not garbage."""
    outbox = open_outbox(tmp_path)
    outbox.add_batch("b", "out", [("1", "hello")])
    outbox.close()

    stranger = Outbox(tmp_path / "outbox.sqlite3", bytes(32))
    with pytest.raises(OutboxError, match="another device key"):
        list(stranger.jobs("b"))


async def test_batch_survives_broker_restart(pool, tmp_path):
    """The broker restarts mid-batch: every accepted job still gets exactly one result."""
    broker = start_broker(tmp_path / "broker")
    worker = start_worker(broker.url, pool, tmp_path / "worker")
    try:
        rows = [{"id": str(n), "prompt": f"Write one sentence about the number {n}."} for n in range(6)]
        batch_id, parsed = read_input(write_input(tmp_path / "in.jsonl", rows))
        outbox = open_outbox(tmp_path)
        outbox.add_batch(batch_id, str(tmp_path / "out.jsonl"), parsed)
        settings = BatchSettings(GenerationParams(max_tokens=24, temperature=0.0), read_concurrency=2)

        async with await Client.connect(broker.url, pool.policy, reply_timeout_s=120) as client:
            runner = BatchRunner(client, outbox, settings)
            await runner.submit(batch_id)

            async def restart_when_first_done() -> None:
                while outbox.counts(batch_id)[JobState.DONE] < 1:
                    await anyio.sleep(0.05)
                broker.process.terminate()
                broker.process.wait(10)
                restarted = start_broker(broker.directory, broker.port)
                broker.process = restarted.process

            async with anyio.create_task_group() as tg:
                tg.start_soon(restart_when_first_done)
                await runner.collect(batch_id)

        counts = outbox.counts(batch_id)
        assert counts[JobState.DONE] == 6
        assert counts[JobState.FAILED] == 0
        assert write_results(outbox, batch_id, tmp_path / "out.jsonl") == 6
    finally:
        stop(worker.process)
        stop(broker.process)


async def test_uncollected_reply_expires(pool, tmp_path):
    """An uncollected reply is gone after the replies stream's time to live."""
    from confide.errors import ReplyIncompleteError
    from confide.schemas.messages import ChatMessage

    broker = start_broker(tmp_path / "broker")
    worker = start_worker(broker.url, pool, tmp_path / "worker")
    try:
        async with await Client.connect(broker.url, pool.policy, reply_timeout_s=2) as client:
            js = client._nc.jetstream()
            config = (await js.stream_info(subjects.REPLIES_STREAM)).config
            config.max_age = 1.0
            config.duplicate_window = 1.0
            await js.update_stream(config)

            job = await client.submit([ChatMessage("user", "Say yes.")], GenerationParams(max_tokens=4))
            with anyio.fail_after(60):
                while (await js.stream_info(subjects.JOBS_STREAM)).state.messages:
                    await anyio.sleep(0.1)
                while (await js.stream_info(subjects.REPLIES_STREAM)).state.messages:
                    await anyio.sleep(0.1)

            with pytest.raises(ReplyIncompleteError):
                [event async for event in client.replies(job)]
    finally:
        stop(worker.process)
        stop(broker.process)


async def test_start_publish_many_in_flight(client):
    """Jobs published with start_publish are all stored, in order, and a republished one is stored once."""
    from confide.schemas.messages import ChatMessage

    before = await jobs_last_sequence(client)
    prepared = [await client.prepare([ChatMessage("user", f"Count to {n}.")], GenerationParams(max_tokens=4)) for n in range(20)]
    pending = [await client.start_publish(job) for job in prepared]
    sequences = [await accepted for accepted in pending]
    again = await (await client.start_publish(prepared[0]))

    assert sequences == list(range(before + 1, before + 21))
    assert again == sequences[0]
    assert await jobs_last_sequence(client) == before + 20


async def test_start_publish_broker_silent_raises(pool, tmp_path, monkeypatch):
    """A broker that stops responding makes the awaitable raise BrokerError, and frees its pending slot."""
    import os
    import signal

    from confide.clients import client as client_module
    from confide.errors import BrokerError
    from confide.schemas.messages import ChatMessage

    monkeypatch.setattr(client_module, "PUBLISH_ACK_TIMEOUT_S", 0.5)
    broker = start_broker(tmp_path / "broker")
    worker = start_worker(broker.url, pool, tmp_path / "worker")
    try:
        async with await Client.connect(broker.url, pool.policy) as connected:
            prepared = await connected.prepare([ChatMessage("user", "Say hello.")], GenerationParams(max_tokens=4))
            os.kill(broker.process.pid, signal.SIGSTOP)
            try:
                accepted = await connected.start_publish(prepared)
                with pytest.raises(BrokerError, match="no acknowledgement for the job within 0.5 s"):
                    await accepted
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)

            assert connected._js.publish_async_pending() == 0
            assert await connected.publish(prepared) > 0
    finally:
        stop(worker.process)
        stop(broker.process)


async def test_batch_submit_survives_silent_broker(pool, tmp_path, monkeypatch):
    """The broker stops responding mid-submit: unacknowledged jobs are published again, and each is stored once."""
    import os
    import signal

    from confide.clients import client as client_module

    monkeypatch.setattr(client_module, "PUBLISH_ACK_TIMEOUT_S", 0.5)
    broker = start_broker(tmp_path / "broker")
    worker = start_worker(broker.url, pool, tmp_path / "worker")
    try:
        rows = [{"id": str(n), "prompt": f"Say the number {n}."} for n in range(40)]
        batch_id, parsed = read_input(write_input(tmp_path / "in.jsonl", rows))
        outbox = open_outbox(tmp_path)
        outbox.add_batch(batch_id, str(tmp_path / "out.jsonl"), parsed)
        settings = BatchSettings(GenerationParams(max_tokens=4, temperature=0.0), publish_chunk=8)
        paused = []

        def pause_once(counts) -> None:
            # After the first chunk is accepted, the broker goes silent for a while.
            if counts.submitted >= 8 and not paused:
                paused.append(True)
                os.kill(broker.process.pid, signal.SIGSTOP)

        async def resume_later() -> None:
            while not paused:
                await anyio.sleep(0.01)
            await anyio.sleep(1.5)
            os.kill(broker.process.pid, signal.SIGCONT)

        async with await Client.connect(broker.url, pool.policy, reply_timeout_s=60) as client:
            before = await jobs_last_sequence(client)
            async with anyio.create_task_group() as tg:
                tg.start_soon(resume_later)
                await BatchRunner(client, outbox, settings, on_progress=pause_once).submit(batch_id)
            after = await jobs_last_sequence(client)

        assert paused
        assert outbox.counts(batch_id)[JobState.ACCEPTED] + outbox.counts(batch_id)[JobState.DONE] == 40
        assert after - before == 40
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
        stop(worker.process)
        stop(broker.process)
