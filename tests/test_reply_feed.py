"""ReplyFeed: chunks in stream order through the reply consumer, and recovery when that consumer is lost."""

from __future__ import annotations

import nats
import pytest

from confide.broker_config.topology import ensure_topology
from confide.clients.replies import HEARTBEAT_S, MISSED_HEARTBEATS, ReplyFeed, delete_reply_consumer
from confide.schemas import crypto, subjects

pytestmark = pytest.mark.anyio


@pytest.fixture
async def connection(broker):
    nc = await nats.connect(broker.url)
    await ensure_topology(nc.jetstream())
    yield nc
    await nc.close()


async def test_feed_reads_chunks_in_order(connection):
    """Chunks stored before and after the feed opens arrive once each, in order."""
    subject = subjects.reply_subject(crypto.random_bytes(32))
    js = connection.jetstream()
    await js.publish(subject, b"first", stream=subjects.REPLIES_STREAM)

    async with ReplyFeed(connection, subject) as feed:
        await js.publish(subject, b"second", stream=subjects.REPLIES_STREAM)
        received = [await feed.next_chunk(10), await feed.next_chunk(10)]

    assert received == [b"first", b"second"]


async def test_feed_recreates_lost_consumer(connection):
    """After its consumer disappears, short waits still notice the silence and the next chunk arrives."""
    subject = subjects.reply_subject(crypto.random_bytes(32))
    js = connection.jetstream()
    await js.publish(subject, b"before", stream=subjects.REPLIES_STREAM)

    async with ReplyFeed(connection, subject) as feed:
        assert await feed.next_chunk(10) == b"before"
        await delete_reply_consumer(connection, subject)
        await js.publish(subject, b"after", stream=subjects.REPLIES_STREAM)

        # One-second waits, shorter than the silence limit, as a caller that
        # checks for something else between chunks makes them.
        chunk = None
        for _ in range(int(4 * HEARTBEAT_S * MISSED_HEARTBEATS)):
            try:
                chunk = await feed.next_chunk(1.0)
                break
            except TimeoutError:
                continue

    assert chunk == b"after"
