"""Pool key rotation on real processes: jobs across a rotation, and jobs sealed to an erased key."""

from __future__ import annotations

import anyio
import nats
import nats.js.errors
import pytest

from conftest import start_broker, start_worker, stop
from confide.clients.client import Client
from confide.schemas import subjects
from confide.schemas.messages import AttestationBody, ChatMessage, GenerationParams, SignedDocument

pytestmark = pytest.mark.anyio

QUICK = GenerationParams(max_tokens=12, temperature=0.0)


async def published_key(url: str) -> bytes:
    nc = await nats.connect(url)
    try:
        entry = await (await nc.jetstream().key_value(subjects.POOL_BUCKET)).get(subjects.ATTESTATION_KEY)
        return AttestationBody.from_bytes(SignedDocument.from_wire(entry.value).body).key
    finally:
        await nc.close()


async def wait_for_rotation(url: str, old_key: bytes) -> bytes:
    with anyio.fail_after(120):
        while (key := await published_key(url)) == old_key:
            await anyio.sleep(0.2)
    return key


async def test_jobs_across_rotation_all_succeed(pool, tmp_path):
    """Five concurrent jobs sealed before a rotation, and five after, all get complete replies."""
    broker = start_broker(tmp_path / "broker")
    rotating = ["--rotate-every", "4", "--key-grace", "60"]
    first = start_worker(broker.url, pool, tmp_path / "w1", "first", rotating)
    second = start_worker(broker.url, pool, tmp_path / "w2", "second", rotating)
    try:
        async with await Client.connect(broker.url, pool.policy, reply_timeout_s=120) as client:
            old_key = (await client.attest()).key
            before = [await client.prepare([ChatMessage("user", f"Say the number {n}.")], QUICK) for n in range(5)]

            new_key = await wait_for_rotation(broker.url, old_key)
            assert new_key != old_key
            after = await client.attest(refresh=True)
            assert after.key == new_key

            replies: list[str] = []

            async def run(prepared) -> None:
                job = prepared.pending(await client.publish(prepared))
                replies.append("".join([event.text async for event in client.replies(job)]))

            async def ask(n: int) -> None:
                replies.append(await client.ask_text([ChatMessage("user", f"Name the colour number {n}.")], QUICK))

            async with anyio.create_task_group() as tg:
                for prepared in before:
                    tg.start_soon(run, prepared)
                for n in range(5):
                    tg.start_soon(ask, n)

        assert len(replies) == 10
        assert all(reply.strip() for reply in replies)
        assert b"rotated the pool key" in first.output() + second.output()
    finally:
        stop(first.process)
        stop(second.process)
        stop(broker.process)


async def test_job_sealed_to_erased_key_gets_signed_notice(pool, tmp_path):
    """A job sealed to an erased epoch is not opened: the worker files a notice the client can verify."""
    from confide.schemas.attestation import verify_document
    from confide.schemas.messages import envelope_digest

    broker = start_broker(tmp_path / "broker")
    worker = start_worker(broker.url, pool, tmp_path / "w", "worker", ["--rotate-every", "3", "--key-grace", "1"])
    try:
        async with await Client.connect(broker.url, pool.policy, reply_timeout_s=60) as client:
            old_key = (await client.attest()).key
            stale = await client.prepare([ChatMessage("user", "Say hello.")], QUICK)
            await wait_for_rotation(broker.url, old_key)
            with anyio.fail_after(60):
                while b"erased pool key epoch" not in worker.output():
                    await anyio.sleep(0.2)

            await client.publish(stale)
            digest = envelope_digest(stale.envelope)
            js = client._nc.jetstream()
            with anyio.fail_after(60):
                while True:
                    try:
                        stored = await js.get_last_msg(subjects.REPLIES_STREAM, subjects.reply_subject(digest))
                        break
                    except nats.js.errors.NotFoundError:
                        await anyio.sleep(0.2)

            notice = verify_document(stored.data, pool.policy, purpose="notice")
            assert notice.key == digest
            with anyio.fail_after(30):
                while worker.stats()["rejections"].get("expired_key", 0) < 1:
                    await anyio.sleep(0.2)

            reply = await client.ask_text([ChatMessage("user", "Say hello.")], QUICK)
            assert reply.strip()
    finally:
        stop(worker.process)
        stop(broker.process)


async def test_job_sealed_to_lost_pool_key_sealed_again(pool, tmp_path):
    """Every worker stops and a new one creates another key: a job sealed to the lost key is sealed again and gets a reply."""
    broker = start_broker(tmp_path / "broker")
    first = start_worker(broker.url, pool, tmp_path / "w1", "first")
    second = None
    try:
        async with await Client.connect(broker.url, pool.policy, reply_timeout_s=60) as client:
            lost_key = (await client.attest()).key
            stop(first.process)
            # Remove the stopped pool's document, so that the new worker creates
            # a key at once instead of first waiting for a member to respond.
            nc = await nats.connect(broker.url)
            try:
                await (await nc.jetstream().key_value(subjects.POOL_BUCKET)).delete(subjects.ATTESTATION_KEY)
            finally:
                await nc.close()
            second = start_worker(broker.url, pool, tmp_path / "w2", "second")
            assert await published_key(broker.url) != lost_key

            # The client's cached document still names the lost key, so ask() seals to it first.
            events = [event async for event in client.ask([ChatMessage("user", "Say hello.")], QUICK)]

        assert "".join(event.text for event in events).strip()
        with anyio.fail_after(30):
            while second.stats()["rejections"].get("unknown_key", 0) < 1:
                await anyio.sleep(0.2)
        # The worker logs the job after its ack, which can come after the client read the final chunk.
        with anyio.fail_after(30):
            while b"job completed" not in second.output():
                await anyio.sleep(0.1)
    finally:
        if second is not None:
            stop(second.process)
        stop(first.process)
        stop(broker.process)
