"""The device's outbox: pending and finished batch jobs in SQLite, encrypted at rest.

Every secret column (the prompt, the job's keys and reply token, the sealed
envelope and the reply) is one XChaCha20-Poly1305 record under a key from
the device's key source. The associated data is the row's (batch, position)
so records cannot be swapped between rows. Keys of finished jobs are erased
by overwriting their record with one that holds only the result.

A job moves pending -> accepted -> done | failed. `pending` jobs have their
envelope and keys written before they are published, so a crash between
publishing and recording the acceptance republishes the same bytes with the
same message id, which JetStream's duplicate window discards.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from confide.errors import AuthenticationError, ConfideError
from confide.schemas import crypto
from confide.schemas.codec import decode, encode

OUTBOX_PERSON_CONTEXT = b"confide outbox v1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id    TEXT PRIMARY KEY,
    output_path TEXT NOT NULL,
    total       INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    batch_id   TEXT NOT NULL REFERENCES batches(batch_id),
    position   INTEGER NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'accepted', 'done', 'failed')),
    record     BLOB NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (batch_id, position)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, batch_id);
"""


class JobState(str, Enum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"


class OutboxError(ConfideError):
    """The outbox is unreadable: wrong device key, or damaged."""


@dataclass
class OutboxJob:
    """One row, decrypted. `secrets` is None once the job is finished and its keys erased."""

    batch_id: str
    position: int
    state: JobState
    input_id: str
    prompt: str | None = None
    secrets: dict | None = None
    result: dict | None = None

    def __repr__(self) -> str:
        return f"OutboxJob(batch={self.batch_id}, position={self.position}, state={self.state.value})"


class Outbox:
    def __init__(self, path: Path, key: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._key = key
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Overwrite freed pages with zeros, so erased job keys do not linger in the file.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _seal(self, batch_id: str, position: int, record: dict) -> bytes:
        return crypto.encrypt_at_rest(self._key, encode(record), encode([batch_id, position]))

    def _open(self, batch_id: str, position: int, stored: bytes) -> dict:
        try:
            plaintext = crypto.decrypt_at_rest(self._key, stored, encode([batch_id, position]))
        except AuthenticationError:
            raise OutboxError(
                f"cannot decrypt the outbox {self.path}: it was written with another device key, or it is damaged"
            ) from None
        return decode(plaintext, len(plaintext))

    def add_batch(self, batch_id: str, output_path: str, rows: list[tuple[str, str]]) -> int:
        """Record a batch and its prompts unless it exists; return how many jobs were added."""
        now = int(time.time())
        existing = self._db.execute("SELECT total FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if existing is not None:
            self._db.execute("UPDATE batches SET output_path = ? WHERE batch_id = ?", (output_path, batch_id))
            return 0

        self._db.execute("BEGIN")
        try:
            self._db.execute("INSERT INTO batches VALUES (?, ?, ?, ?)", (batch_id, output_path, len(rows), now))
            self._db.executemany(
                "INSERT INTO jobs VALUES (?, ?, 'pending', ?, ?)",
                (
                    (batch_id, position, self._seal(batch_id, position, {"input_id": input_id, "prompt": prompt}), now)
                    for position, (input_id, prompt) in enumerate(rows)
                ),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return len(rows)

    def jobs(self, batch_id: str | None = None, states: tuple[JobState, ...] = tuple(JobState)) -> Iterator[OutboxJob]:
        marks = ",".join("?" for _ in states)
        query = f"SELECT batch_id, position, state, record FROM jobs WHERE state IN ({marks})"
        arguments: list[object] = [state.value for state in states]
        if batch_id is not None:
            query += " AND batch_id = ?"
            arguments.append(batch_id)
        query += " ORDER BY batch_id, position"
        for row_batch, position, state, stored in self._db.execute(query, arguments).fetchall():
            record = self._open(row_batch, position, stored)
            yield OutboxJob(
                batch_id=row_batch,
                position=position,
                state=JobState(state),
                input_id=record["input_id"],
                prompt=record.get("prompt"),
                secrets=record.get("secrets"),
                result=record.get("result"),
            )

    def counts(self, batch_id: str) -> dict[JobState, int]:
        counts = {state: 0 for state in JobState}
        for state, count in self._db.execute("SELECT state, COUNT(*) FROM jobs WHERE batch_id = ? GROUP BY state", (batch_id,)):
            counts[JobState(state)] = count
        return counts

    def batches(self) -> list[tuple[str, str, int]]:
        return self._db.execute("SELECT batch_id, output_path, total FROM batches ORDER BY created_at").fetchall()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group updates into one SQLite transaction: one commit, instead of one for each statement."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def save_secrets(self, job: OutboxJob, secrets: dict) -> None:
        """Store a pending job's envelope and keys before it is published."""
        record = {"input_id": job.input_id, "prompt": job.prompt, "secrets": secrets}
        self._update(job, JobState.PENDING, record)
        job.secrets = secrets

    def mark_accepted(self, job: OutboxJob, stream_sequence: int) -> None:
        assert job.secrets is not None
        secrets = {**job.secrets, "stream_sequence": stream_sequence}
        # The prompt stays (encrypted) until the job finishes: a job sealed to
        # a pool key that is erased before a worker takes it is sealed again.
        self._update(job, JobState.ACCEPTED, {"input_id": job.input_id, "prompt": job.prompt, "secrets": secrets})
        job.secrets = secrets
        job.state = JobState.ACCEPTED

    def finish(self, job: OutboxJob, result: dict, failed: bool) -> None:
        """Store the result and erase the job's keys and reply token."""
        state = JobState.FAILED if failed else JobState.DONE
        self._update(job, state, {"input_id": job.input_id, "result": result})
        job.secrets = None
        job.state = state
        job.result = result

    def _update(self, job: OutboxJob, state: JobState, record: dict) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, record = ?, updated_at = ? WHERE batch_id = ? AND position = ?",
            (state.value, self._seal(job.batch_id, job.position, record), int(time.time()), job.batch_id, job.position),
        )

    def __repr__(self) -> str:
        return f"Outbox({self.path})"
