"""Builders of valid and hostile job messages, shared by the hostile-input tests and the fuzz runner.

Nothing here publishes. Each builder returns the bytes that a test then sends
to the jobs subject of a broker it started itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confide.schemas import crypto, subjects
from confide.schemas.codec import encode
from confide.schemas.messages import (
    JOB_ID_SIZE,
    PROTOCOL_VERSION,
    REPLY_TOKEN_SIZE,
    ChatMessage,
    GenerationParams,
    JobEnvelope,
    JobRequest,
    bucket_for,
)
from confide.schemas.reply_keys import ReplyReceiver

# A short, valid prompt whose reply costs a few tokens of generation.
SHORT_PROMPT = "Name one colour."
TIMESTAMP_GRANULARITY_S = 60


def current_timestamp() -> int:
    """Return the time rounded down to the minute, as the reference client seals it."""
    return int(time.time()) // TIMESTAMP_GRANULARITY_S * TIMESTAMP_GRANULARITY_S


def pad_job(plaintext: bytes) -> bytes:
    return crypto.pad(plaintext, bucket_for(len(plaintext)))


@dataclass(repr=False)
class BuiltJob:
    """A job's wire bytes and, where a test built the request, the keys that read its reply."""

    wire: bytes
    job_id: bytes = b""
    reply_token: bytes = b""
    client_secret: bytes = field(default=b"")

    @property
    def has_reply_keys(self) -> bool:
        return bool(self.reply_token)

    @property
    def reply_subject(self) -> str:
        return subjects.reply_subject(self.reply_token)

    def receiver(self) -> ReplyReceiver:
        """Return a fresh receiver for this job's reply, with its own copy of the client key."""
        return ReplyReceiver(self.job_id, self.reply_token, crypto.KeyPair(self.client_secret))

    def __repr__(self) -> str:
        return f"BuiltJob(wire=[{len(self.wire)} bytes])"


@dataclass(frozen=True, repr=False)
class JobFactory:
    """Seals jobs to one pool key, the way a client does, with every field under the caller's control."""

    pool_key: bytes
    key_id: bytes

    def request(
        self,
        messages: tuple[ChatMessage, ...] = (ChatMessage("user", SHORT_PROMPT),),
        *,
        timestamp: int | None = None,
        max_tokens: int = 4,
        client_key: bytes | None = None,
    ) -> tuple[JobRequest, bytes]:
        """Return a job request with fresh ids and the client secret key that reads its reply."""
        client = crypto.KeyPair.generate()
        request = JobRequest(
            job_id=crypto.random_bytes(JOB_ID_SIZE),
            reply_token=crypto.random_bytes(REPLY_TOKEN_SIZE),
            client_key=client.public if client_key is None else client_key,
            timestamp=current_timestamp() if timestamp is None else timestamp,
            messages=messages,
            params=GenerationParams(max_tokens=max_tokens, temperature=0.0),
        )
        return request, client.secret

    def job(self, *messages: ChatMessage, **options: Any) -> BuiltJob:
        """Build a sealed job, with a valid one-line prompt when no messages are given."""
        request, client_secret = self.request(messages or (ChatMessage("user", SHORT_PROMPT),), **options)
        return BuiltJob(self.seal_padded(request.to_padded()), request.job_id, request.reply_token, client_secret)

    def seal_padded(self, padded: bytes, key_id: bytes | None = None) -> bytes:
        """Seal padded payload bytes to the pool key and wrap them in an envelope."""
        return JobEnvelope(self.key_id if key_id is None else key_id, crypto.seal(padded, self.pool_key)).to_wire()

    def seal_payload_map(self, payload: Any) -> bytes:
        """Encode any msgpack value as the payload, pad it and seal it properly."""
        return self.seal_padded(pad_job(encode(payload)))


def payload_map(request: JobRequest) -> dict[str, Any]:
    """Return the msgpack map a job request encodes to, for tests that change its fields."""
    return {
        "v": PROTOCOL_VERSION,
        "job_id": request.job_id,
        "reply_token": request.reply_token,
        "client_key": request.client_key,
        "ts": request.timestamp,
        "messages": [{"role": message.role, "content": message.content} for message in request.messages],
        "params": request.params.to_map(),
    }


def envelope_map(wire: bytes) -> dict[str, Any]:
    """Return the msgpack map of an envelope built by JobFactory, for tests that change its fields."""
    envelope = JobEnvelope.from_wire(wire)
    return {"v": PROTOCOL_VERSION, "type": "job", "key_id": envelope.key_id, "sealed": envelope.sealed}

