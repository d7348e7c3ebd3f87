"""The reply key schedule: a per-attempt root from X25519, then a KDF chain.

For each delivery attempt the worker draws a fresh X25519 key pair and
computes

    dh      = X25519(worker_secret, client_key)
    root    = BLAKE2b-256(key=dh, personal="confide:replyrt1",
                          msgpack([client_key, worker_key, job_id, reply_token, attempt]))
    chain_0 = root

and for chunk i

    message_key_i = BLAKE2b-256(key=chain_i, personal="confide:msgkey:1")
    chain_{i+1}   = BLAKE2b-256(key=chain_i, personal="confide:chain:v1")

after which chain_i is overwritten. This is the symmetric-key ratchet of the
Signal double ratchet spec (section 2.2) with keyed BLAKE2b in place of
HMAC: a chain key taken at step i reveals nothing about chunks before i.

The receiver decrypts with a copy of its chain and commits the step only
after the chunk authenticates, so a forged chunk cannot advance its state.
"""

from __future__ import annotations

from dataclasses import dataclass

from confide.errors import ReplyOrderError
from confide.schemas import crypto
from confide.schemas.codec import encode
from confide.schemas.messages import ChunkBody, ReplyChunk, chunk_associated_data

ROOT_PERSON = b"confide:replyrt1"
CHAIN_PERSON = b"confide:chain:v1"
MESSAGE_KEY_PERSON = b"confide:msgkey:1"


def derive_root(shared: bytes, client_key: bytes, worker_key: bytes, job_id: bytes, reply_token: bytes, attempt: int) -> bytes:
    return crypto.kdf(shared, ROOT_PERSON, encode([client_key, worker_key, job_id, reply_token, attempt]))


class ChainKey:
    """One step of the KDF chain; `step()` returns the message key and moves on."""

    __slots__ = ("index", "_key")

    def __init__(self, key: bytes, index: int = 0) -> None:
        self._key = bytearray(key)
        self.index = index

    def step(self) -> bytes:
        message_key = crypto.kdf(bytes(self._key), MESSAGE_KEY_PERSON)
        next_key = crypto.kdf(bytes(self._key), CHAIN_PERSON)
        self._erase()
        self._key = bytearray(next_key)
        self.index += 1
        return message_key

    def copy(self) -> ChainKey:
        return ChainKey(bytes(self._key), self.index)

    def erase(self) -> None:
        self._erase()

    def _erase(self) -> None:
        # NOTE: best effort in CPython, which may keep other copies of the bytes.
        for i in range(len(self._key)):
            self._key[i] = 0

    def __repr__(self) -> str:
        return f"ChainKey(index={self.index})"


class ReplySender:
    """The worker's side of one delivery attempt: encrypts chunks in order."""

    def __init__(self, job_id: bytes, reply_token: bytes, client_key: bytes, attempt: int, worker_keys: crypto.KeyPair | None = None) -> None:
        keys = worker_keys or crypto.KeyPair.generate()
        shared = crypto.x25519(keys.secret, client_key)
        self.worker_key = keys.public
        self.attempt = attempt
        self._chain = ChainKey(derive_root(shared, client_key, keys.public, job_id, reply_token, attempt))
        # The worker's secret is needed for nothing after the root exists.
        keys.erase()
        self.finished = False

    def seal(self, body: ChunkBody, final: bool) -> ReplyChunk:
        if self.finished:
            raise RuntimeError("the reply is already finished")

        index = self._chain.index
        message_key = self._chain.step()
        ad = chunk_associated_data(self.attempt, index, final, self.worker_key)
        ciphertext = crypto.aead_encrypt(message_key, body.to_padded(), ad)
        if final:
            self.finished = True
            self._chain.erase()
        return ReplyChunk(self.attempt, index, final, self.worker_key, ciphertext)

    def __repr__(self) -> str:
        return f"ReplySender(attempt={self.attempt}, index={self._chain.index})"


@dataclass(frozen=True)
class OpenedChunk:
    body: ChunkBody
    final: bool
    restarted: bool  # True when this chunk starts a newer attempt than the one shown so far


class ReplyReceiver:
    """The client's side of one job: opens chunks across attempts.

    - a chunk of an older attempt than the current one is ignored;
    - a chunk of a newer attempt starts that attempt over, and must be its index 0;
    - a chunk whose index was already opened is a duplicate and is ignored;
    - a chunk past the next expected index raises ReplyOrderError;
    - a chunk under the current attempt but another worker key is ignored;
    - a chunk that fails authentication raises AuthenticationError.
    State changes only after a chunk authenticates.
    """

    def __init__(self, job_id: bytes, reply_token: bytes, client_keys: crypto.KeyPair) -> None:
        self._job_id = job_id
        self._reply_token = reply_token
        self._client_keys = client_keys
        self._attempt = 0
        self._chain: ChainKey | None = None
        self._worker_key = b""
        self.complete = False
        self.ignored = 0
        self.foreign = 0

    @property
    def attempt(self) -> int:
        return self._attempt

    def open(self, chunk: ReplyChunk) -> OpenedChunk | None:
        if self.complete or chunk.attempt < self._attempt:
            self.ignored += 1
            return None

        new_attempt = chunk.attempt > self._attempt
        restarted = new_attempt and self._attempt > 0
        if new_attempt:
            if chunk.index != 0:
                raise ReplyOrderError(f"attempt {chunk.attempt} began at chunk {chunk.index}, not 0")
            shared = crypto.x25519(self._client_keys.secret, chunk.worker_key)
            root = derive_root(shared, self._client_keys.public, chunk.worker_key, self._job_id, self._reply_token, chunk.attempt)
            chain = ChainKey(root)
        else:
            assert self._chain is not None
            if chunk.index < self._chain.index:
                self.ignored += 1
                return None
            if chunk.index > self._chain.index:
                raise ReplyOrderError(f"expected chunk {self._chain.index}, got chunk {chunk.index}")
            if not crypto.constant_time_equal(chunk.worker_key, self._worker_key):
                # Another key under the same attempt number: a replayed job
                # run by a second worker, or an injection. It cannot be
                # opened with this chain, so it is ignored, not fatal.
                self.foreign += 1
                return None
            chain = self._chain.copy()

        message_key = chain.step()
        padded = crypto.aead_decrypt(message_key, chunk.ciphertext, chunk.associated_data())
        body = ChunkBody.from_padded(padded, chunk.final)

        # Authenticated: commit the new state.
        if self._chain is not None:
            self._chain.erase()
        self._chain = chain
        self._attempt = chunk.attempt
        self._worker_key = chunk.worker_key
        if chunk.final:
            self.finish()
        return OpenedChunk(body, chunk.final, restarted)

    def finish(self) -> None:
        """Erase every key of this job; called on the final chunk or when giving up."""
        self.complete = True
        if self._chain is not None:
            self._chain.erase()
        self._client_keys.erase()

    def __repr__(self) -> str:
        return f"ReplyReceiver(attempt={self._attempt}, complete={self.complete})"
