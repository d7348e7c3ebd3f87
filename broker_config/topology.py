"""Streams, the workers' consumer and the pool bucket, created idempotently.

Settings are the protocol's (schemas/PROTOCOL.md lists them); both
`confide up` and a worker joining an existing broker call ensure_topology.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from confide.schemas import subjects

MAX_PAYLOAD = 1024 * 1024


@dataclass(frozen=True)
class Topology:
    job_max_age_s: float = 24 * 3600.0
    # Long enough for a batch user or an offline phone to come back for replies.
    reply_ttl_s: float = 24 * 3600.0
    # Seconds an unacknowledged job waits before JetStream delivers it to
    # another worker. `confide worker --ack-wait` sets it on the shared consumer.
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    duplicate_window_s: float = 120.0
    jobs_max_bytes: int = 2 * 1024**3
    replies_max_bytes: int = 2 * 1024**3

    def jobs_stream(self) -> StreamConfig:
        return StreamConfig(
            name=subjects.JOBS_STREAM,
            subjects=[subjects.JOBS_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=self.job_max_age_s,
            max_bytes=self.jobs_max_bytes,
            max_msg_size=MAX_PAYLOAD,
            discard=DiscardPolicy.NEW,
            duplicate_window=self.duplicate_window_s,
            num_replicas=1,
        )

    def replies_stream(self) -> StreamConfig:
        return StreamConfig(
            name=subjects.REPLIES_STREAM,
            subjects=[f"{subjects.REPLY_SUBJECT_PREFIX}.*.{subjects.REPLY_SUBJECT_SUFFIX}"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=self.reply_ttl_s,
            max_bytes=self.replies_max_bytes,
            max_msg_size=MAX_PAYLOAD,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
            num_replicas=1,
        )

    def workers_consumer(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=subjects.WORKERS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=1024,
            filter_subject=subjects.JOBS_SUBJECT,
        )

    def pool_bucket(self) -> KeyValueConfig:
        return KeyValueConfig(bucket=subjects.POOL_BUCKET, history=1, storage=StorageType.FILE)


async def ensure_topology(js: JetStreamContext, topology: Topology = Topology()) -> None:
    for config in (topology.jobs_stream(), topology.replies_stream()):
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)
    await js.add_consumer(subjects.JOBS_STREAM, topology.workers_consumer())
    await js.create_key_value(topology.pool_bucket())
