"""Batch jobs: submit many prompts, collect the replies later, lose nothing.

Every job is written to the outbox (encrypted at rest) before it is
published, and its acceptance is recorded when JetStream acknowledges it.
So a run that is interrupted and started again continues where it stopped
without resubmitting an accepted job. Results are written in input order
once every job of the batch is done or failed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats.errors

from confide.clients.client import Client, PreparedJob
from confide.clients.outbox import JobState, Outbox, OutboxJob
from confide.errors import (
    AuthenticationError,
    BrokerError,
    KeyExpiredError,
    ConfideError,
    ReplyError,
    ReplyIncompleteError,
    ReplyOrderError,
)
from confide.schemas import crypto, subjects
from confide.schemas.codec import encode
from confide.schemas.messages import ChatMessage, GenerationParams

log = logging.getLogger("confide.batch")

BATCH_PERSON = b"confide:batch:v1"
PUBLISH_CONCURRENCY = 64
# Jobs sealed, stored and published together: one outbox commit each step,
# and this many PubAcks outstanding at once.
PUBLISH_CHUNK = 512
READ_CONCURRENCY = 8
RETRY_DELAY_S = 0.5


class BatchInputError(ConfideError):
    """The batch input file is not valid JSONL with a prompt on every line."""


class BatchOutputError(ConfideError):
    """The results file cannot be written where the user asked."""


@dataclass
class BatchCounts:
    total: int = 0
    submitted: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed


@dataclass
class BatchSettings:
    params: GenerationParams = field(default_factory=GenerationParams)
    first_chunk_timeout_s: float = 3600.0
    publish_concurrency: int = PUBLISH_CONCURRENCY
    publish_chunk: int = PUBLISH_CHUNK
    read_concurrency: int = READ_CONCURRENCY
    # Each job waits a random time up to this many seconds before it is
    # published, so the broker cannot tie a burst of jobs to one client by timing.
    max_delay_s: float = 0.0


def read_input(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Parse JSONL rows of {"id"?, "prompt"}; return the file's batch id and (id, prompt) rows.

    A row without an id gets its line number. Ids must be unique, because
    the results name their inputs by id.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BatchInputError(f"cannot read {path}: {exc.strerror}") from None

    rows = []
    first_line: dict[str, int] = {}
    # utf-8-sig: a byte order mark, as some editors write, is not part of the first line.
    for number, raw_line in enumerate(data.splitlines(), start=1):
        try:
            line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise BatchInputError(f"{path}:{number}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not valid JSON"
            column = f", column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise BatchInputError(f"{path}:{number}{column}: not valid JSON ({reason})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise BatchInputError(f'{path}:{number}: each line must be an object with a string "prompt"')
        input_id = str(row.get("id", number))
        if input_id in first_line:
            raise BatchInputError(f"{path}:{number}: id {input_id!r} repeats line {first_line[input_id]}; each line needs its own id")
        first_line[input_id] = number
        rows.append((input_id, row["prompt"]))
    if not rows:
        raise BatchInputError(f"{path} has no prompts")
    return crypto.digest(data, BATCH_PERSON, 16).hex(), rows


def batch_id_for(input_id: str, params: GenerationParams) -> str:
    """Name a batch by its input file and its generation settings.

    The same file run again with the same settings resumes; with other
    settings it is a batch of its own, rather than the earlier results.
    """
    return crypto.digest(bytes.fromhex(input_id) + encode(params.to_map()), BATCH_PERSON, 16).hex()


class BatchRunner:
    def __init__(self, client: Client, outbox: Outbox, settings: BatchSettings, on_progress: Callable[[BatchCounts], None] = lambda counts: None) -> None:
        self._client = client
        self._outbox = outbox
        self._settings = settings
        self._on_progress = on_progress
        self.counts = BatchCounts()

    def _count_from_outbox(self, batch_id: str | None) -> None:
        self.counts = BatchCounts()
        batches = [batch_id] if batch_id else [row[0] for row in self._outbox.batches()]
        for name in batches:
            counts = self._outbox.counts(name)
            self.counts.total += sum(counts.values())
            self.counts.submitted += counts[JobState.ACCEPTED] + counts[JobState.DONE] + counts[JobState.FAILED]
            self.counts.done += counts[JobState.DONE]
            self.counts.failed += counts[JobState.FAILED]
        self._on_progress(self.counts)

    async def submit(self, batch_id: str) -> None:
        """Publish every pending job of the batch, retrying through broker restarts."""
        self._count_from_outbox(batch_id)
        if self._settings.max_delay_s > 0:
            await self._submit_with_delays(batch_id)
            return
        chunk: list[OutboxJob] = []
        for job in self._outbox.jobs(batch_id, (JobState.PENDING,)):
            chunk.append(job)
            if len(chunk) == self._settings.publish_chunk:
                await self._submit_chunk(chunk)
                chunk = []
        if chunk:
            await self._submit_chunk(chunk)

    async def _submit_chunk(self, jobs: list[OutboxJob]) -> None:
        """Seal, store, publish and record a chunk of jobs, with one outbox transaction for each step.

        The order keeps the outbox's promise: a job's envelope and keys are
        stored before it is published, and its acceptance only after
        JetStream acknowledged it. A run stopped in between publishes the
        same envelope again when started again, and its message id lets
        JetStream store it once within the duplicate window.
        """
        ready: list[tuple[OutboxJob, PreparedJob]] = []
        sealed: list[tuple[OutboxJob, PreparedJob]] = []
        for job in jobs:
            if not (job.prompt or "").strip() and job.secrets is None:
                self._fail_job(job, "empty_prompt", "the prompt is empty")
                continue
            if job.secrets is not None:
                ready.append((job, PreparedJob.from_secrets(job.secrets)))
                continue
            try:
                sealed.append((job, await self._client.prepare([ChatMessage("user", job.prompt or "")], self._settings.params)))
            except ConfideError as exc:
                self._fail_job(job, type(exc).__name__, str(exc))
        with self._outbox.transaction():
            for job, prepared in sealed:
                self._outbox.save_secrets(job, prepared.to_secrets())
        ready += sealed

        while ready:
            accepted, unaccepted = await self._publish_all(ready)
            with self._outbox.transaction():
                for job, sequence in accepted:
                    self._outbox.mark_accepted(job, sequence)
            self.counts.submitted += len(accepted)
            self._on_progress(self.counts)
            if unaccepted:
                log.warning("the broker accepted %d of %d jobs; publishing the rest again in %.1f s", len(accepted), len(ready), RETRY_DELAY_S)
                await anyio.sleep(RETRY_DELAY_S)
            ready = unaccepted

    async def _publish_all(
        self, ready: list[tuple[OutboxJob, PreparedJob]]
    ) -> tuple[list[tuple[OutboxJob, int]], list[tuple[OutboxJob, PreparedJob]]]:
        """Publish every job with its acknowledgement outstanding; return the accepted ones and the rest."""
        started: list[tuple[OutboxJob, PreparedJob, Awaitable[int] | None]] = []
        for job, prepared in ready:
            try:
                started.append((job, prepared, await self._client.start_publish(prepared)))
            except BrokerError:
                started.append((job, prepared, None))
        accepted: list[tuple[OutboxJob, int]] = []
        unaccepted: list[tuple[OutboxJob, PreparedJob]] = []
        for job, prepared, acknowledgement in started:
            sequence = None
            if acknowledgement is not None:
                try:
                    sequence = await acknowledgement
                except BrokerError:
                    pass  # published again by the caller
            if sequence is None:
                unaccepted.append((job, prepared))
            else:
                accepted.append((job, sequence))
        return accepted, unaccepted

    def _fail_job(self, job: OutboxJob, code: str, message: str) -> None:
        self._outbox.finish(job, {"error": {"code": code, "message": message}}, failed=True)
        self.counts.submitted += 1
        self.counts.failed += 1
        self._on_progress(self.counts)

    async def _submit_with_delays(self, batch_id: str) -> None:
        """Publish each job after its own random delay, many at once, so their timing does not show one client."""
        limiter = anyio.Semaphore(self._settings.publish_concurrency)
        async with anyio.create_task_group() as tg:
            for job in self._outbox.jobs(batch_id, (JobState.PENDING,)):
                await limiter.acquire()
                tg.start_soon(self._submit_one, job, limiter)

    async def _submit_one(self, job: OutboxJob, limiter: anyio.Semaphore) -> None:
        try:
            if not (job.prompt or "").strip() and job.secrets is None:
                self._fail_job(job, "empty_prompt", "the prompt is empty")
                return
            if job.secrets is None:
                prepared = await self._client.prepare([ChatMessage("user", job.prompt or "")], self._settings.params)
                self._outbox.save_secrets(job, prepared.to_secrets())
            else:
                prepared = PreparedJob.from_secrets(job.secrets)
            await anyio.sleep(secrets.SystemRandom().uniform(0, self._settings.max_delay_s))

            sequence = await self._publish_until_accepted(prepared)
            self._outbox.mark_accepted(job, sequence)
            self.counts.submitted += 1
            self._on_progress(self.counts)
        except ConfideError as exc:
            self._fail_job(job, type(exc).__name__, str(exc))
        finally:
            limiter.release()

    async def _publish_until_accepted(self, prepared: PreparedJob) -> int:
        while True:
            try:
                return await self._client.publish(prepared)
            except BrokerError as exc:
                log.warning("publishing failed (%s); retrying in %.1f s", exc, RETRY_DELAY_S)
                await anyio.sleep(RETRY_DELAY_S)

    async def collect(self, batch_id: str | None = None, wait: bool = True) -> None:
        """Read the replies of accepted jobs into the outbox.

        With wait=False, jobs whose reply has not started are left for a later call.
        """
        self._count_from_outbox(batch_id)
        limiter = anyio.Semaphore(self._settings.read_concurrency)
        async with anyio.create_task_group() as tg:
            for job in self._outbox.jobs(batch_id, (JobState.ACCEPTED,)):
                if not wait and not await self._reply_started(job):
                    continue
                await limiter.acquire()
                tg.start_soon(self._collect_one, job, limiter)

    async def _reply_started(self, job: OutboxJob) -> bool:
        assert job.secrets is not None
        return await self._client.reply_waiting(subjects.reply_subject(job.secrets["reply_token"]))

    async def _collect_one(self, job: OutboxJob, limiter: anyio.Semaphore) -> None:
        try:
            result, failed = await self._read_reply(job)
            self._outbox.finish(job, result, failed)
            if failed:
                self.counts.failed += 1
            else:
                self.counts.done += 1
            self._on_progress(self.counts)
        finally:
            limiter.release()

    async def _read_reply(self, job: OutboxJob) -> tuple[dict, bool]:
        """Read one reply from its first stored chunk, starting over after a broker failure."""
        assert job.secrets is not None
        while True:
            pending = PreparedJob.from_secrets(job.secrets).pending(job.secrets["stream_sequence"])
            parts: list[str] = []
            started = False
            try:
                async for event in self._client.replies(pending, first_chunk_timeout_s=self._settings.first_chunk_timeout_s):
                    if not started:
                        started = True
                        self.counts.running += 1
                        self._on_progress(self.counts)
                    if event.restarted:
                        parts.clear()
                    parts.append(event.text)
                    if event.final:
                        return {"reply": "".join(parts), "finish": event.finish, "completion_tokens": event.completion_tokens}, False
            except KeyExpiredError:
                log.info("the pool no longer has a batch job's pool key; sealing the job again")
                await self._reseal(job)
                continue
            except ReplyError as exc:
                return {"error": {"code": exc.code, "message": exc.detail}}, True
            except (AuthenticationError, ReplyOrderError) as exc:
                return {"error": {"code": "reply_tampered", "message": str(exc)}}, True
            except ReplyIncompleteError as exc:
                return {"error": {"code": "no_reply", "message": str(exc)}}, True
            except nats.errors.Error as exc:
                log.warning("reading a reply failed (%s); starting that reply over", type(exc).__name__)
                await anyio.sleep(RETRY_DELAY_S)
            finally:
                if started:
                    self.counts.running -= 1


    async def _reseal(self, job: OutboxJob) -> None:
        """Seal an accepted job again to the current pool key and publish it."""
        await self._client.attest(refresh=True)
        prepared = await self._client.prepare([ChatMessage("user", job.prompt or "")], self._settings.params)
        self._outbox.save_secrets(job, prepared.to_secrets())
        self._outbox.mark_accepted(job, await self._publish_until_accepted(prepared))


def write_results(outbox: Outbox, batch_id: str, output: Path) -> int:
    """Write the batch's results in input order, atomically; return the number of rows.

    Raises BatchOutputError when the file cannot be written.
    """
    temporary = output.with_name(output.name + ".partial")
    rows = 0
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            for job in outbox.jobs(batch_id):
                record = {"id": job.input_id, **(job.result or {})}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                rows += 1
        os.replace(temporary, output)
    except OSError as exc:
        raise BatchOutputError(f"cannot write the results to {output}: {exc.strerror}") from None
    return rows


def check_output(output: Path) -> None:
    """Raise BatchOutputError unless results can be written at `output`, before any job is sent."""
    directory = output.resolve().parent
    if not directory.is_dir():
        raise BatchOutputError(f"cannot write the results to {output}: the folder {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise BatchOutputError(f"cannot write the results to {output}: the folder {directory} is not writable")
    if output.is_dir():
        raise BatchOutputError(f"cannot write the results to {output}: it is a folder")
