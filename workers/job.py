"""One job, from a pulled JetStream message to an acknowledged, encrypted reply.

Every byte of the message is hostile until it authenticates. A job that can
never succeed (undecodable, sealed to an unknown key, failing to open) is
terminated so JetStream does not redeliver it. Once the reply token is
readable, every failure gets an authenticated error reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from confide.errors import AuthenticationError, DecodeError
from confide.schemas import crypto, subjects
from confide.schemas.messages import ChunkBody, JobEnvelope, JobRequest, envelope_digest
from confide.schemas.reply_keys import ReplySender
from confide.workers.engine import Engine, GenerationResult, PromptTooLongError, TemplateMismatchError
from confide.workers.pool_key import PoolKeyHolder
from confide.workers.stats import WorkerStats

log = logging.getLogger("confide.worker.job")

# Seconds before a job sealed to an unknown pool key is offered again, so a
# member with that key can take it.
UNKNOWN_KEY_RETRY_S = 2.0
# Larger text pieces are split so one chunk stays well under the chunk limit.
MAX_CHUNK_CHARS = 4096


@dataclass(frozen=True)
class JobSettings:
    acceptance_window_s: int = 24 * 3600
    clock_skew_s: int = 300
    progress_interval_s: float = 10.0
    # The consumer's max_deliver. The delivery numbered this is not run: it
    # only sends an error reply, because every earlier attempt died with its
    # worker, and JetStream would not deliver the job again.
    max_deliver: int = 5


# About 270 bytes per id in CPython 3.11 (measured with tracemalloc), so about 260 MB at most.
DEFAULT_REPLAY_ENTRIES = 1_000_000
EVICTION_LOG_EVERY = 10_000


# At most NOTICE_BURST key notices per NOTICE_WINDOW_S; more are suppressed.
NOTICE_BURST = 100
NOTICE_WINDOW_S = 10


class NoticeBudget:
    """A token bucket: `burst` notices at once, refilled evenly over `window_s`."""

    def __init__(self, burst: int = NOTICE_BURST, window_s: float = NOTICE_WINDOW_S) -> None:
        self._burst = burst
        self._rate = burst / window_s
        self._tokens = float(burst)
        self._updated: float | None = None

    def take(self, now: float) -> bool:
        if self._updated is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class ReplayGuard:
    """Remembers job ids seen within the acceptance window, with their stream sequence.

    A redelivery carries the same stream sequence and is allowed; the same
    job id under another sequence is a replay.
    NOTE: per worker process; a replay that reaches another worker of the
    pool is not caught here.

    Anyone can seal jobs to the pool key, so the number of ids is capped:
    at `max_entries` the oldest id is forgotten before the window ends.
    That shortens replay protection under a flood of jobs, but turns no
    other user's job away. `evicted` counts the forgotten ids.
    """

    def __init__(self, window_s: int, max_entries: int = DEFAULT_REPLAY_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._window_s = window_s
        self._max_entries = max_entries
        self._seen: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, job_id: bytes, stream_sequence: int, now: float) -> bool:
        while self._seen:
            oldest_id, (_, seen_at) = next(iter(self._seen.items()))
            if now - seen_at <= self._window_s:
                break
            del self._seen[oldest_id]

        previous = self._seen.get(job_id)
        if previous is not None:
            return previous[0] == stream_sequence
        if len(self._seen) >= self._max_entries:
            self._seen.popitem(last=False)
            if self.evicted % EVICTION_LOG_EVERY == 0:
                log.warning(
                    "replay memory is full at %d job ids: forgetting the oldest before the acceptance window ends "
                    "(%d forgotten so far)", self._max_entries, self.evicted + 1,
                )
            self.evicted += 1
        self._seen[job_id] = (stream_sequence, now)
        return True


class JobRunner:
    def __init__(
        self,
        js: JetStreamContext,
        engine: Engine,
        pool: PoolKeyHolder,
        stats: WorkerStats,
        settings: JobSettings,
    ) -> None:
        self._js = js
        self._engine = engine
        self._pool = pool
        self._stats = stats
        self._settings = settings
        self._replays = ReplayGuard(settings.acceptance_window_s + settings.clock_skew_s)
        self._notices = NoticeBudget()
        self._limiter = anyio.CapacityLimiter(1)

    async def run(self, message: Msg) -> None:
        """Process one pulled job; bad message content ends in a rejection, not an exception.

        Broker failures (publish or ack) do raise, and the caller logs them.
        """
        started = time.monotonic()
        metadata = message.metadata
        attempt = metadata.num_delivered
        sequence = metadata.sequence.stream
        log.debug("job started seq=%d attempt=%d size=%d", sequence, attempt, len(message.data))

        request = await self._open(message)
        if request is None:
            return

        try:
            sender = ReplySender(request.job_id, request.reply_token, request.client_key, attempt)
        except AuthenticationError:
            await self._terminate(message, "bad_client_key", sequence)
            return
        reply_subject = subjects.reply_subject(request.reply_token)

        problem = self._check(request, sequence)
        if problem is None and attempt >= self._settings.max_deliver:
            problem = (
                "too_many_attempts",
                f"the job was started {attempt - 1} times and each attempt ended without a reply; it will not be retried",
            )
        if problem is not None:
            code, detail = problem
            await self._finish_with_error(message, sender, reply_subject, code, detail, sequence)
            return

        await self._generate(message, request, sender, reply_subject, started, sequence)

    async def _open(self, message: Msg) -> JobRequest | None:
        sequence = message.metadata.sequence.stream
        try:
            envelope = JobEnvelope.from_wire(message.data)
        except DecodeError as exc:
            await self._terminate(message, exc.reason, sequence)
            return None

        keys = self._pool.keys_for(envelope.key_id)
        if keys is None and not self._pool.is_erased(envelope.key_id):
            # Perhaps the pool rotated since this worker last looked.
            await self._pool.sync()
            keys = self._pool.keys_for(envelope.key_id)
        if keys is None:
            await self._no_key(message, envelope.key_id, sequence)
            return None
        try:
            padded = crypto.unseal(envelope.sealed, keys)
        except AuthenticationError:
            await self._terminate(message, "unseal_failed", sequence)
            return None
        try:
            return JobRequest.from_padded(padded)
        except DecodeError as exc:
            await self._terminate(message, f"payload_{exc.reason}", sequence)
            return None

    def _check(self, request: JobRequest, sequence: int) -> tuple[str, str] | None:
        now = time.time()
        window = self._settings.acceptance_window_s
        skew = self._settings.clock_skew_s
        if request.timestamp > now + skew:
            return "timestamp_in_future", "the job's timestamp is ahead of the worker's clock; check the device clock"
        if now - request.timestamp > window + skew:
            return "expired", f"the job is older than the {window} s acceptance window; send it again"
        if not self._replays.check_and_remember(request.job_id, sequence, now):
            return "replayed", "this job id was already received; a job is answered once"
        if request.messages[-1].role != "user":
            return "invalid_messages", "the last message must have role 'user'"
        if not request.messages[-1].content.strip():
            return "empty_prompt", "the prompt is empty"
        return None

    async def _generate(
        self, message: Msg, request: JobRequest, sender: ReplySender, reply_subject: str, started: float, sequence: int
    ) -> None:
        try:
            tokens = await anyio.to_thread.run_sync(self._engine.prompt_tokens, request.messages, limiter=self._limiter)
        except PromptTooLongError as exc:
            detail = f"the prompt is {exc.prompt_tokens} tokens but the model's context holds {exc.limit}; shorten it"
            await self._finish_with_error(message, sender, reply_subject, "prompt_too_long", detail, sequence)
            return
        except TemplateMismatchError:
            # For example a template that drops system messages: this job's
            # messages cannot be placed, though other jobs' can.
            detail = "the model's chat template cannot place these messages; send them with other roles"
            await self._finish_with_error(message, sender, reply_subject, "invalid_messages", detail, sequence)
            return

        send_text, receive_text = anyio.create_memory_object_stream[str](max_buffer_size=float("inf"))
        stop = threading.Event()
        progress = _Progress()

        def on_text(text: str) -> None:
            anyio.from_thread.run_sync(send_text.send_nowait, text)

        def generate() -> GenerationResult | Exception:
            try:
                return self._engine.generate(tokens, request.params, on_text, stop)
            except Exception as exc:  # reported to the client as internal_error, logged by type
                return exc
            finally:
                anyio.from_thread.run_sync(send_text.close)

        try:
            async with anyio.create_task_group() as helpers:
                helpers.start_soon(self._progress_acks, message)
                helpers.start_soon(_set_on_cancel, stop)
                async with anyio.create_task_group() as publishing:
                    publishing.start_soon(self._publish_text, receive_text, sender, reply_subject, progress)
                    result = await anyio.to_thread.run_sync(generate, limiter=self._limiter)
                helpers.cancel_scope.cancel()
            # run_sync waits for the thread even when cancelled and then
            # returns, often with the BrokenResourceError of a text piece that
            # no publisher took. A shutdown must hand the job back rather than
            # send an error reply, so raise the pending cancellation here.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            # Shutting down mid-generation: hand the job back for another worker.
            with anyio.CancelScope(shield=True):
                await message.nak()
            log.info("job handed back for redelivery seq=%d attempt=%d", sequence, sender.attempt)
            raise

        if isinstance(result, Exception):
            log.error("generation failed seq=%d error=%s", sequence, type(result).__name__)
            await self._finish_with_error(message, sender, reply_subject, "internal_error", "the model failed on this job", sequence)
            return

        final = ChunkBody("", result.finish, result.prompt_tokens, result.completion_tokens)
        with anyio.CancelScope(shield=True):
            await self._js.publish(reply_subject, sender.seal(final, final=True).to_wire(), stream=subjects.REPLIES_STREAM)
            await message.ack_sync()
        self._stats.outcome("completed")

        elapsed = time.monotonic() - started
        ttft = (progress.first_at - started) if progress.first_at is not None else elapsed
        log.info(
            "job completed seq=%d attempt=%d size=%d finish=%s prompt_tokens=%d completion_tokens=%d "
            "chunks=%d ttft_ms=%d duration_ms=%d model=%s",
            sequence,
            sender.attempt,
            len(message.data),
            result.finish,
            result.prompt_tokens,
            result.completion_tokens,
            progress.chunks + 1,
            ttft * 1000,
            elapsed * 1000,
            self._engine.model_name,
        )

    async def _publish_text(
        self, receive: MemoryObjectReceiveStream[str], sender: ReplySender, reply_subject: str, progress: _Progress
    ) -> None:
        """Encrypt and store text as it comes, joining pieces that queued during a publish."""
        async with receive:
            async for text in receive:
                pieces = [text]
                while True:
                    try:
                        pieces.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                joined = "".join(pieces)
                for start in range(0, len(joined), MAX_CHUNK_CHARS):
                    chunk = sender.seal(ChunkBody(joined[start : start + MAX_CHUNK_CHARS]), final=False)
                    await self._js.publish(reply_subject, chunk.to_wire(), stream=subjects.REPLIES_STREAM)
                    progress.chunk_published()

    async def _progress_acks(self, message: Msg) -> None:
        """Tell JetStream the job is alive, so generation never outlives the ack wait."""
        while True:
            await anyio.sleep(self._settings.progress_interval_s)
            await message.in_progress()

    async def _finish_with_error(
        self, message: Msg, sender: ReplySender, reply_subject: str, code: str, detail: str, sequence: int
    ) -> None:
        body = ChunkBody("", "error", error=code, detail=detail)
        with anyio.CancelScope(shield=True):
            await self._js.publish(reply_subject, sender.seal(body, final=True).to_wire(), stream=subjects.REPLIES_STREAM)
            await message.ack_sync()
        self._stats.rejected(code)
        log.info("job rejected with error reply seq=%d reason=%s", sequence, code)

    async def _no_key(self, message: Msg, key_id: bytes, sequence: int) -> None:
        """Handle a job sealed to a pool key this worker does not hold.

        A job sealed to the key the pool has just published, which this
        worker has not fetched yet, goes back to the queue for a member
        that has it. Any other such job can never be opened: an erased
        epoch's (expired_key), or one the pool never had or lost when all
        its members stopped (unknown_key). For those the worker files a
        signed notice the client can find from the envelope, so the client
        seals the job again to the current key, and terminates the job.
        """
        if self._pool.is_published(key_id) and message.metadata.num_delivered < self._settings.max_deliver:
            with anyio.CancelScope(shield=True):
                await message.nak(delay=UNKNOWN_KEY_RETRY_S)
            log.info("job handed back: sealed to a pool key this worker lacks seq=%d", sequence)
            return

        reason = "expired_key" if self._pool.is_erased(key_id) else "unknown_key"
        if self._notices.take(time.monotonic()):
            digest = envelope_digest(message.data)
            notice = await self._pool.attest_notice(digest)
            with anyio.CancelScope(shield=True):
                await self._js.publish(subjects.reply_subject(digest), notice, stream=subjects.REPLIES_STREAM)
        else:
            # Anyone can publish jobs under made-up key ids; unlimited notices
            # would fill the replies stream, which drops its oldest replies.
            self._stats.outcome("notice_suppressed")
            log.warning("no key notice for job seq=%d: more than %d notices in %d s", sequence, NOTICE_BURST, NOTICE_WINDOW_S)
        await self._terminate(message, reason, sequence)

    async def _terminate(self, message: Msg, reason: str, sequence: int) -> None:
        """Stop redelivery of a job that can never succeed; no reply is possible."""
        with anyio.CancelScope(shield=True):
            await message.term()
        self._stats.rejected(reason)
        log.info("job terminated seq=%d reason=%s size=%d", sequence, reason, len(message.data))


class _Progress:
    def __init__(self) -> None:
        self.chunks = 0
        self.first_at: float | None = None

    def chunk_published(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.chunks += 1


async def _set_on_cancel(stop: threading.Event) -> None:
    """Wait forever; when cancelled, tell the generating thread to stop."""
    try:
        await anyio.sleep_forever()
    finally:
        stop.set()
