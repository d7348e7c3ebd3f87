"""The device-side client: verify the pool, seal a job, stream its reply.

Plaintext exists only in this process. What goes to the broker is a sealed,
padded job on the shared jobs subject and a consumer of one reply subject
named by a one-way hash of the job's secret reply token.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from confide.broker_config.credentials import ClientCredential, tls_context
from confide.broker_config.permissions import CLIENT_API_PREFIX
from confide.errors import (
    AttestationError,
    BrokerError,
    DecodeError,
    EmptyPromptError,
    JobTooLargeError,
    KeyExpiredError,
    LocalProtocolError,
    ReplyError,
    ReplyIncompleteError,
)
from confide.clients.log_monitor import LogMonitor
from confide.clients.replies import ReplyFeed, reply_waiting
from confide.schemas import crypto, subjects
from confide.schemas.attestation import TrustPolicy, verify_document, verify_with_steps
from confide.schemas.codec import MAX_STRING
from confide.schemas.messages import (
    JOB_ID_SIZE,
    MAX_MESSAGES,
    PAD_BUCKETS,
    REPLY_TOKEN_SIZE,
    AttestationBody,
    ChatMessage,
    GenerationParams,
    JobEnvelope,
    JobRequest,
    ReplyChunk,
    envelope_digest,
)
from confide.schemas.reply_keys import ReplyReceiver

log = logging.getLogger("confide.client")

# Sealed timestamps are rounded down to this many seconds so they reveal
# little about when exactly a person wrote.
TIMESTAMP_GRANULARITY_S = 60
# NATS protocol framing around a published payload: the PUB/HPUB line with
# subject, sizes and CRLFs. Counted so the size check matches the server's.
PUBLISH_FRAMING = 128
# A verified pool document is fetched again after this many seconds, so a
# long chat follows key rotations.
ATTESTATION_CACHE_S = 60.0
# How often a client waiting for a job's first chunk checks for a
# key notice, and how many times ask() seals a job again after one.
NOTICE_POLL_S = 2.0
RESUBMISSIONS = 3
# "Nats-Msg-Id: <32 hex digits>" plus the NATS/1.0 header line and CRLFs.
MESSAGE_ID_HEADER_SIZE = 64
# How long start_publish's awaitable waits for JetStream's PubAck. It is
# longer than publish()'s wait (nats-py 2.16's JetStream default, 5 s),
# because many acknowledgements may be queued ahead of this one.
PUBLISH_ACK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PendingJob:
    """A job the broker accepted, with the keys to read its reply."""

    receiver: ReplyReceiver
    reply_subject: str
    stream_sequence: int
    # Digest of the published envelope: a worker that finds the job sealed to
    # a pool key the pool no longer has files a signed notice under reply_subject(digest).
    envelope_digest: bytes | None = None

    def __repr__(self) -> str:
        return f"PendingJob(seq={self.stream_sequence})"


@dataclass(frozen=True, repr=False)
class PreparedJob:
    """A sealed job ready to publish, with everything needed to read its reply later.

    `message_id` is a random per-job value sent as the Nats-Msg-Id header so a
    republished job is deduplicated; it names no client.
    """

    envelope: bytes
    message_id: str
    job_id: bytes
    reply_token: bytes
    client_secret: bytes

    def pending(self, stream_sequence: int) -> PendingJob:
        receiver = ReplyReceiver(self.job_id, self.reply_token, crypto.KeyPair(self.client_secret))
        return PendingJob(receiver, subjects.reply_subject(self.reply_token), stream_sequence, envelope_digest(self.envelope))

    def to_secrets(self) -> dict[str, object]:
        return {
            "envelope": self.envelope,
            "message_id": self.message_id,
            "job_id": self.job_id,
            "reply_token": self.reply_token,
            "client_secret": self.client_secret,
        }

    @classmethod
    def from_secrets(cls, secrets: dict) -> PreparedJob:
        return cls(secrets["envelope"], secrets["message_id"], secrets["job_id"], secrets["reply_token"], secrets["client_secret"])

    def __repr__(self) -> str:
        return f"PreparedJob(envelope=[{len(self.envelope)} bytes])"


@dataclass(frozen=True)
class ReplyEvent:
    """One step of a streamed reply: text to show, a restart, or the end."""

    text: str = ""
    restarted: bool = False
    final: bool = False
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Acknowledgement:
    """An awaitable of one job's stream sequence.

    It makes its coroutine only when awaited, so one that is dropped
    unawaited (a batch interrupted mid-chunk) leaves no "never awaited" warning.
    """

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future) -> None:
        self._future = future

    def __await__(self):
        return _stream_sequence(self._future).__await__()


async def _stream_sequence(future: asyncio.Future) -> int:
    """Wait for a PubAck from nats-py's publish_async and return its stream sequence."""
    try:
        with anyio.fail_after(PUBLISH_ACK_TIMEOUT_S):
            ack = await future
    except TimeoutError:
        # Cancelling runs nats-py's done callback, which frees the pending slot.
        future.cancel()
        raise BrokerError(f"the broker sent no acknowledgement for the job within {PUBLISH_ACK_TIMEOUT_S:g} s") from None
    except nats.errors.Error as exc:
        raise BrokerError(f"the broker did not accept the job: {type(exc).__name__}") from None
    return ack.seq


class Client:
    def __init__(self, nc: NATS, policy: TrustPolicy, reply_timeout_s: float = 300.0, log_monitor: LogMonitor | None = None) -> None:
        self._nc = nc
        self._log_monitor = log_monitor
        # The client API prefix, which the broker maps onto $JS.API
        # (broker_config/permissions.py); it works through a relay too.
        self._js: JetStreamContext = nc.jetstream(prefix=CLIENT_API_PREFIX)
        self._policy = policy
        self._pool: AttestationBody | None = None
        self._fetched_at = 0.0
        self.reply_timeout_s = reply_timeout_s

    @classmethod
    async def connect(
        cls,
        url: str,
        policy: TrustPolicy,
        reply_timeout_s: float = 300.0,
        log_monitor: LogMonitor | None = None,
        credentials: ClientCredential | None = None,
        tls_ca: Path | None = None,
    ) -> Client:
        """Connect to the broker; once connected, reconnect without limit after a drop.

        `credentials` is the shared client credential, with which each
        connection signs in as a fresh user, or None for a broker without
        authentication. `tls_ca` is the CA file that verifies the broker's
        TLS certificate.
        """
        # nats-py retries even the first connection max_reconnect_attempts
        # times, so an unreachable broker is detected with one probe first.
        await _probe(url)

        async def on_error(exc: Exception) -> None:
            log.warning("broker connection error: %s", type(exc).__name__)

        options = _security_options(credentials, tls_ca)
        try:
            # A rejected credential or certificate fails the same way on every
            # try, so the first connection is not retried; later drops are.
            nc = await nats.connect(
                url,
                name="confide-client",
                allow_reconnect=False,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                error_cb=on_error,
                **options,
            )
        except nats.errors.AuthorizationError:
            raise BrokerError(f"the broker at {url} rejected the client credential; pass the broker's client credential with --creds") from None
        except ssl.SSLError as exc:
            raise BrokerError(f"TLS with the broker at {url} failed ({type(exc).__name__}); pass the CA that signed its certificate with --tls-ca") from None
        except (OSError, nats.errors.Error) as exc:
            raise BrokerError(f"cannot connect to the broker at {url}: {type(exc).__name__}; is it running? ('confide up' starts one)") from None
        nc.options["allow_reconnect"] = True
        return cls(nc, policy, reply_timeout_s, log_monitor)

    async def close(self) -> None:
        await self._nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    async def attest(self, refresh: bool = False) -> AttestationBody:
        """Fetch and verify the pool's attestation document; raise AttestationError on any failure."""
        now = time.time()
        if self._pool is not None and not refresh and self._pool.expires_at > now and now - self._fetched_at < ATTESTATION_CACHE_S:
            return self._pool

        try:
            kv = await self._js.key_value(subjects.POOL_BUCKET)
            entry = await kv.get(subjects.ATTESTATION_KEY)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError, nats.js.errors.NotFoundError):
            raise AttestationError("the pool attestation document was not found on the broker: no worker has joined the pool yet; start one with 'confide up' or 'confide worker'") from None
        except nats.errors.Error as exc:
            raise BrokerError(f"reading the pool attestation failed: {type(exc).__name__}") from None
        if not entry.value:
            raise AttestationError("the pool attestation document is empty")

        verified = verify_with_steps(entry.value, self._policy, purpose="pool")
        if verified.tree_head is not None and self._log_monitor is not None and self._policy.log_key is not None:
            await self._log_monitor.check(self._js, verified.tree_head, self._policy.log_key)
        self._pool = verified.body
        self._fetched_at = now
        return self._pool

    async def submit(self, messages: Sequence[ChatMessage], params: GenerationParams = GenerationParams()) -> PendingJob:
        """Seal a job to the attested pool key and publish it; return once JetStream stored it."""
        prepared = await self.prepare(messages, params)
        sequence = await self.publish(prepared)
        return prepared.pending(sequence)

    async def prepare(self, messages: Sequence[ChatMessage], params: GenerationParams = GenerationParams()) -> PreparedJob:
        """Seal a job to the attested pool key without publishing it."""
        if not messages or not messages[-1].content.strip():
            raise EmptyPromptError()
        _check_limits(messages)
        pool = await self.attest()

        client_keys = crypto.KeyPair.generate()
        job_id = crypto.random_bytes(JOB_ID_SIZE)
        reply_token = crypto.random_bytes(REPLY_TOKEN_SIZE)
        timestamp = int(time.time()) // TIMESTAMP_GRANULARITY_S * TIMESTAMP_GRANULARITY_S
        request = JobRequest(job_id, reply_token, client_keys.public, timestamp, tuple(messages), params)
        limit = self._nc.max_payload
        try:
            padded = request.to_padded()
        except ValueError:
            raise JobTooLargeError(_unpadded_size(request), min(limit, PAD_BUCKETS[-1]), "chat") from None
        envelope = JobEnvelope(pool.key_id, crypto.seal(padded, pool.key)).to_wire()

        if len(envelope) + PUBLISH_FRAMING + MESSAGE_ID_HEADER_SIZE > limit:
            raise JobTooLargeError(len(envelope) + PUBLISH_FRAMING + MESSAGE_ID_HEADER_SIZE, limit)
        prepared = PreparedJob(envelope, crypto.random_bytes(16).hex(), job_id, reply_token, client_keys.secret)
        client_keys.erase()
        return prepared

    async def publish(self, prepared: PreparedJob) -> int:
        """Publish a prepared job and return its stream sequence once JetStream stored it.

        Publishing the same prepared job again within the jobs stream's
        duplicate window stores nothing new: the message id deduplicates it.
        """
        try:
            ack = await self._js.publish(
                subjects.JOBS_SUBJECT,
                prepared.envelope,
                stream=subjects.JOBS_STREAM,
                headers={"Nats-Msg-Id": prepared.message_id},
            )
        except nats.errors.Error as exc:
            raise BrokerError(f"the broker did not accept the job: {type(exc).__name__}") from None
        return ack.seq

    async def start_publish(self, prepared: PreparedJob) -> Awaitable[int]:
        """Publish a prepared job without waiting for JetStream; return an awaitable of its stream sequence.

        For many jobs at once: the caller keeps a window of these awaitables
        and awaits the oldest, so that it need not wait for each
        acknowledgement before the next publish. Awaiting raises BrokerError when JetStream
        refuses the job or sends no acknowledgement within PUBLISH_ACK_TIMEOUT_S.
        """
        try:
            future = await self._js.publish_async(
                subjects.JOBS_SUBJECT,
                prepared.envelope,
                stream=subjects.JOBS_STREAM,
                headers={"Nats-Msg-Id": prepared.message_id},
            )
        except nats.errors.Error as exc:
            raise BrokerError(f"the broker did not accept the job: {type(exc).__name__}") from None
        return _Acknowledgement(future)

    async def replies(self, job: PendingJob, first_chunk_timeout_s: float | None = None) -> AsyncIterator[ReplyEvent]:
        """Yield the job's reply as it arrives; raise on tampering, an error reply or a timeout.

        `first_chunk_timeout_s` bounds the wait for the first chunk (a queued
        job may wait long for a worker); later chunks wait reply_timeout_s.
        """
        receiver = job.receiver
        timeout = first_chunk_timeout_s or self.reply_timeout_s
        feed = ReplyFeed(self._nc, job.reply_subject)
        try:
            await feed.open()
        except nats.errors.Error as exc:
            receiver.finish()
            raise BrokerError(f"opening the reply for reading failed: {type(exc).__name__}") from None
        except BrokerError:
            receiver.finish()
            raise
        try:
            while not receiver.complete:
                try:
                    if receiver.attempt == 0 and job.envelope_digest is not None:
                        data = await self._first_chunk(feed, job.envelope_digest, timeout)
                    else:
                        data = await feed.next_chunk(timeout)
                except TimeoutError:
                    raise ReplyIncompleteError(
                        f"no reply chunk for {timeout:.0f} s and the final chunk never came; the reply is incomplete"
                    ) from None
                except nats.errors.Error as exc:
                    raise BrokerError(f"reading the reply failed: {type(exc).__name__}") from None
                timeout = self.reply_timeout_s
                try:
                    chunk = ReplyChunk.from_wire(data)
                except DecodeError as exc:
                    log.warning("ignored a malformed reply chunk: %s", exc.reason)
                    continue

                try:
                    opened = receiver.open(chunk)
                except DecodeError as exc:
                    # Authenticated, so the worker itself sent it: a worker bug, not tampering.
                    raise ReplyError("malformed_reply", f"the worker sent an unreadable reply chunk ({exc.reason})") from None
                if opened is None:
                    continue
                body = opened.body
                if body.error is not None:
                    raise ReplyError(body.error, body.detail or "")
                yield ReplyEvent(
                    text=body.text,
                    restarted=opened.restarted,
                    final=opened.final,
                    finish=body.finish,
                    prompt_tokens=body.prompt_tokens,
                    completion_tokens=body.completion_tokens,
                )
        finally:
            receiver.finish()
            await feed.close()

    async def reply_waiting(self, reply_subject: str) -> bool:
        """Return whether the broker stores at least one chunk on `reply_subject`."""
        return await reply_waiting(self._nc, reply_subject)

    async def _first_chunk(self, feed: ReplyFeed, digest: bytes, timeout: float) -> bytes:
        """Wait for the first chunk, checking now and then for a signed key notice."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                return await feed.next_chunk(min(NOTICE_POLL_S, remaining))
            except TimeoutError:
                pass
            if await self._expired_notice(digest):
                raise KeyExpiredError("the pool no longer has the key this job was sealed to; seal it again")

    async def _expired_notice(self, digest: bytes) -> bool:
        """Return True if an attested worker signed a key notice for this envelope digest."""
        subject = subjects.reply_subject(digest)
        if not await reply_waiting(self._nc, subject):
            return False
        async with ReplyFeed(self._nc, subject) as notices:
            try:
                unverified = await notices.next_chunk(NOTICE_POLL_S)
            except TimeoutError:
                return False
        try:
            body = verify_document(unverified, self._policy, purpose="notice")
        except AttestationError as exc:
            log.warning("ignored a key notice that failed verification: %s", exc)
            return False
        return crypto.constant_time_equal(body.key, digest)

    async def ask(self, messages: Sequence[ChatMessage], params: GenerationParams = GenerationParams()) -> AsyncIterator[ReplyEvent]:
        """Submit a job and yield its reply; a job sealed to a key the pool no longer has is sealed again by itself."""
        for _ in range(RESUBMISSIONS):
            job = await self.submit(messages, params)
            try:
                async for event in self.replies(job):
                    yield event
                return
            except KeyExpiredError:
                log.info("the pool no longer has the key this job was sealed to; sealing the job again to the current key")
                await self.attest(refresh=True)
        raise KeyExpiredError(
            f"the job was sealed {RESUBMISSIONS} times to a pool key the pool no longer has; check the pool's key rotation settings"
        )

    async def ask_text(self, messages: Sequence[ChatMessage], params: GenerationParams = GenerationParams()) -> str:
        """Return the whole reply text; an attempt restart discards the partial text."""
        parts: list[str] = []
        async for event in self.ask(messages, params):
            if event.restarted:
                parts.clear()
            parts.append(event.text)
        return "".join(parts)


def _security_options(credentials: ClientCredential | None, tls_ca: Path | None) -> dict:
    """Return the nats.connect arguments for the credential and the broker's CA."""
    options: dict = {}
    if credentials is not None:
        options.update(credentials.connect_options())
    if tls_ca is not None:
        options["tls"] = tls_context(tls_ca)
    return options


async def _probe(url: str) -> None:
    """Raise BrokerError unless something accepts TCP connections at the URL's address."""
    parsed = urlsplit(url)
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or 4222
    try:
        with anyio.fail_after(5):
            stream = await anyio.connect_tcp(host, port)
    except (OSError, TimeoutError):
        raise BrokerError(f"cannot connect to the broker at {url}: nothing listens there; is it running? ('confide up' starts one)") from None
    await stream.aclose()


def _check_limits(messages: Sequence[ChatMessage]) -> None:
    """Reject, before sealing, what the worker's decoder would reject unread."""
    if len(messages) > MAX_MESSAGES:
        raise LocalProtocolError(f"the chat has {len(messages)} messages but a job can contain at most {MAX_MESSAGES}; start a new chat")
    for message in messages:
        size = len(message.content.encode("utf-8"))
        if size > MAX_STRING:
            raise JobTooLargeError(size, MAX_STRING, "message")


def _unpadded_size(request: JobRequest) -> int:
    return sum(len(m.content.encode("utf-8")) for m in request.messages)
