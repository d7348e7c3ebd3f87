"""Typed wire messages of protocol version 1 and their one decode each.

Every message is a msgpack map whose "v" field is the protocol version. A
peer that receives a version it does not speak rejects the message with
reason unsupported_version. Reprs show sizes and fingerprints, never
payloads, keys or reply tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confide.errors import DecodeError
from confide.schemas import crypto
from confide.schemas.codec import Fields, decode, encode

PROTOCOL_VERSION = 1

KEY_ID_SIZE = 8
JOB_ID_SIZE = 16
REPLY_TOKEN_SIZE = 32

# Sealed job plaintexts are padded to one of these sizes before sealing, so
# the broker learns only the bucket, not the prompt's length.
PAD_BUCKETS = tuple(1024 << shift for shift in range(10))  # 1 KiB to 512 KiB
# Reply chunk plaintexts are padded to a multiple of this many bytes.
CHUNK_PAD_BLOCK = 64

MAX_JOB_ENVELOPE = PAD_BUCKETS[-1] + crypto.SEAL_OVERHEAD + 64
MAX_CHUNK_TEXT = 64 * 1024
MAX_CHUNK_ENVELOPE = 2 * MAX_CHUNK_TEXT
MAX_DOCUMENT = 16 * 1024
MAX_MESSAGES = 256
MAX_MAX_TOKENS = 32768

ROLES = frozenset({"system", "user", "assistant"})
FINISH_REASONS = frozenset({"stop", "length", "error"})
PLATFORMS = frozenset({"simulated", "sev-snp", "tdx"})
PURPOSES = frozenset({"pool", "join", "notice"})

REPLY_SUBJECT_PERSON = b"confide:rsubj:v1"
NOTICE_PERSON = b"confide:notice:1"
KEY_ID_PERSON = b"confide:keyid:v1"


def key_id_for(pool_public: bytes) -> bytes:
    return crypto.digest(pool_public, KEY_ID_PERSON, KEY_ID_SIZE)


def reply_subject_token(reply_token: bytes) -> str:
    """Return the hex name of a job's reply subject, one-way from the reply token.

    The broker stores this name but cannot recover the token from it.
    """
    return crypto.digest(reply_token, REPLY_SUBJECT_PERSON, 16).hex()


def envelope_digest(envelope: bytes) -> bytes:
    """Return the digest that names a job's key notice.

    A worker that cannot open a job never learns its reply token, so the
    notice is filed under reply_subject(envelope_digest(envelope)), which
    both the client and the worker can compute from the published bytes.
    """
    return crypto.digest(envelope, NOTICE_PERSON)


# -- job envelope: what the client publishes to the jobs subject -------------


@dataclass(frozen=True, repr=False)
class JobEnvelope:
    key_id: bytes
    sealed: bytes

    def to_wire(self) -> bytes:
        return encode({"v": PROTOCOL_VERSION, "type": "job", "key_id": self.key_id, "sealed": self.sealed})

    @classmethod
    def from_wire(cls, data: bytes) -> JobEnvelope:
        fields = Fields(decode(data, MAX_JOB_ENVELOPE), "job", {"v", "type", "key_id", "sealed"}, version=PROTOCOL_VERSION)
        fields.string("type", choices=frozenset({"job"}))
        key_id = fields.binary("key_id", size=KEY_ID_SIZE)
        # Check the sealed field's size before any decryption is tried.
        sealed = fields.binary("sealed", min_size=crypto.SEAL_OVERHEAD + PAD_BUCKETS[0], max_size=PAD_BUCKETS[-1] + crypto.SEAL_OVERHEAD)
        if len(sealed) - crypto.SEAL_OVERHEAD not in PAD_BUCKETS:
            raise DecodeError("wrong_size", f"sealed payload of {len(sealed)} bytes is not a padding bucket plus {crypto.SEAL_OVERHEAD}")
        return cls(key_id, sealed)

    def __repr__(self) -> str:
        return f"JobEnvelope(key_id={self.key_id.hex()}, sealed=[{len(self.sealed)} bytes])"


# -- the sealed inner payload -------------------------------------------------


@dataclass(frozen=True, repr=False)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None

    def to_map(self) -> dict[str, object]:
        params: dict[str, object] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            params["seed"] = self.seed
        return params

    @classmethod
    def from_map(cls, value: object) -> GenerationParams:
        fields = Fields(value, "job.params", {"max_tokens", "temperature", "top_p"}, frozenset({"seed"}))
        return cls(
            max_tokens=fields.integer("max_tokens", 1, MAX_MAX_TOKENS),
            temperature=fields.number("temperature", 0.0, 2.0),
            top_p=fields.number("top_p", 0.0, 1.0),
            seed=fields.integer("seed", 0, 2**31 - 1) if fields.has("seed") else None,
        )


@dataclass(frozen=True, repr=False)
class JobRequest:
    """The plaintext sealed inside a job envelope."""

    job_id: bytes
    reply_token: bytes
    client_key: bytes
    timestamp: int
    messages: tuple[ChatMessage, ...]
    params: GenerationParams = field(default_factory=GenerationParams)

    def to_padded(self) -> bytes:
        plaintext = encode(
            {
                "v": PROTOCOL_VERSION,
                "job_id": self.job_id,
                "reply_token": self.reply_token,
                "client_key": self.client_key,
                "ts": self.timestamp,
                "messages": [{"role": m.role, "content": m.content} for m in self.messages],
                "params": self.params.to_map(),
            }
        )
        return crypto.pad(plaintext, bucket_for(len(plaintext)))

    @classmethod
    def from_padded(cls, padded: bytes) -> JobRequest:
        if len(padded) not in PAD_BUCKETS:
            raise DecodeError("wrong_size", f"padded payload of {len(padded)} bytes is not a padding bucket")
        try:
            plaintext = crypto.unpad(padded, len(padded))
        except Exception:
            raise DecodeError("bad_padding", "the payload's padding is invalid") from None

        fields = Fields(
            decode(plaintext, len(plaintext)),
            "job.payload",
            {"v", "job_id", "reply_token", "client_key", "ts", "messages", "params"},
            version=PROTOCOL_VERSION,
        )
        return cls(
            job_id=fields.binary("job_id", size=JOB_ID_SIZE),
            reply_token=fields.binary("reply_token", size=REPLY_TOKEN_SIZE),
            client_key=fields.binary("client_key", size=crypto.KEY_SIZE),
            timestamp=fields.integer("ts", 0, 2**40),
            messages=_decode_messages(fields.array("messages", MAX_MESSAGES)),
            params=GenerationParams.from_map(fields.raw("params")),
        )

    def __repr__(self) -> str:
        return f"JobRequest(messages={len(self.messages)}, params={self.params})"


def bucket_for(size: int) -> int:
    """Return the smallest padding bucket with room for `size` bytes plus sodium_pad's marker."""
    for bucket in PAD_BUCKETS:
        if size < bucket:
            return bucket
    raise ValueError(f"a {size}-byte payload exceeds the largest padding bucket ({PAD_BUCKETS[-1]} bytes)")


def _decode_messages(items: list[object]) -> tuple[ChatMessage, ...]:
    if not items:
        raise DecodeError("empty_messages", "job.payload.messages is empty")

    messages = []
    for item in items:
        fields = Fields(item, "job.payload.messages[]", {"role", "content"})
        messages.append(ChatMessage(fields.string("role", 16, ROLES), fields.string("content")))
    return tuple(messages)


# -- reply chunks ---------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ReplyChunk:
    """One encrypted piece of a reply, stored on the job's reply subject."""

    attempt: int
    index: int
    final: bool
    worker_key: bytes
    ciphertext: bytes

    def to_wire(self) -> bytes:
        return encode(
            {
                "v": PROTOCOL_VERSION,
                "type": "chunk",
                "attempt": self.attempt,
                "index": self.index,
                "final": self.final,
                "worker_key": self.worker_key,
                "ct": self.ciphertext,
            }
        )

    @classmethod
    def from_wire(cls, data: bytes) -> ReplyChunk:
        fields = Fields(
            decode(data, MAX_CHUNK_ENVELOPE),
            "chunk",
            {"v", "type", "attempt", "index", "final", "worker_key", "ct"},
            version=PROTOCOL_VERSION,
        )
        fields.string("type", choices=frozenset({"chunk"}))
        return cls(
            attempt=fields.integer("attempt", 1, 2**31),
            index=fields.integer("index", 0, 2**31),
            final=fields.boolean("final"),
            worker_key=fields.binary("worker_key", size=crypto.KEY_SIZE),
            ciphertext=fields.binary("ct", min_size=crypto.AEAD_TAG_SIZE + CHUNK_PAD_BLOCK, max_size=MAX_CHUNK_ENVELOPE),
        )

    def associated_data(self) -> bytes:
        """Return the AEAD associated data: a fixed-order msgpack array of the header."""
        return chunk_associated_data(self.attempt, self.index, self.final, self.worker_key)

    def __repr__(self) -> str:
        return f"ReplyChunk(attempt={self.attempt}, index={self.index}, final={self.final}, ct=[{len(self.ciphertext)} bytes])"


def chunk_associated_data(attempt: int, index: int, final: bool, worker_key: bytes) -> bytes:
    return encode([PROTOCOL_VERSION, "chunk", attempt, index, final, worker_key])


@dataclass(frozen=True, repr=False)
class ChunkBody:
    """The plaintext of a reply chunk.

    The final chunk carries the finish reason and token counts. An error reply
    is a final chunk with finish "error", a stable `error` code and a `detail`
    sentence for the user.
    """

    text: str
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    detail: str | None = None

    def to_padded(self) -> bytes:
        body: dict[str, object] = {"text": self.text}
        if self.finish is not None:
            body.update(finish=self.finish, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        if self.error is not None:
            body.update(error=self.error, detail=self.detail or "")
        return crypto.pad(encode(body), _round_up(len(encode(body)) + 1, CHUNK_PAD_BLOCK))

    @classmethod
    def from_padded(cls, padded: bytes, final: bool) -> ChunkBody:
        if len(padded) == 0 or len(padded) % CHUNK_PAD_BLOCK:
            raise DecodeError("wrong_size", f"chunk plaintext of {len(padded)} bytes is not a multiple of {CHUNK_PAD_BLOCK}")
        try:
            plaintext = crypto.unpad(padded, CHUNK_PAD_BLOCK)
        except Exception:
            raise DecodeError("bad_padding", "the chunk's padding is invalid") from None

        optional = frozenset({"finish", "prompt_tokens", "completion_tokens", "error", "detail"})
        fields = Fields(decode(plaintext, len(plaintext)), "chunk.body", {"text"}, optional)
        text = fields.string("text", MAX_CHUNK_TEXT)
        if not final:
            if fields.has("finish") or fields.has("error"):
                raise DecodeError("unexpected_field", "a non-final chunk carries a finish reason")
            return cls(text)

        if not fields.has("finish"):
            raise DecodeError("missing_field", "the final chunk lacks ['finish']")
        finish = fields.string("finish", 16, FINISH_REASONS)
        error = fields.string("error", 64) if fields.has("error") else None
        if (finish == "error") != (error is not None):
            raise DecodeError("inconsistent", "finish 'error' and the error code must come together")
        return cls(
            text=text,
            finish=finish,
            prompt_tokens=fields.integer("prompt_tokens", 0, 2**31) if fields.has("prompt_tokens") else 0,
            completion_tokens=fields.integer("completion_tokens", 0, 2**31) if fields.has("completion_tokens") else 0,
            error=error,
            detail=fields.string("detail", 1024) if fields.has("detail") else None,
        )

    def __repr__(self) -> str:
        return f"ChunkBody(text=[{len(self.text)} chars], finish={self.finish}, error={self.error})"


def _round_up(size: int, block: int) -> int:
    return (size + block - 1) // block * block


# -- attestation and key release ----------------------------------------------


@dataclass(frozen=True, repr=False)
class AttestationBody:
    """A TEE platform's signed statement (possibly simulated) about one worker key.

    purpose "pool" binds the pool's sealing key and is what clients verify;
    purpose "join" binds a joining worker's one-time key for key release.
    """

    platform: str
    simulated: bool
    measurement: bytes
    purpose: str
    key: bytes
    issued_at: int
    expires_at: int
    model: str
    # A worker started in development mode runs a measurement that need not
    # be in the release log. Clients reject such a pool unless their policy allows it.
    dev_mode: bool = False

    def to_bytes(self) -> bytes:
        body: dict[str, object] = {
            "v": PROTOCOL_VERSION,
            "platform": self.platform,
            "simulated": self.simulated,
            "measurement": self.measurement,
            "purpose": self.purpose,
            "key": self.key,
            "key_id": key_id_for(self.key),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "model": self.model,
        }
        if self.dev_mode:
            body["dev_mode"] = True
        return encode(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> AttestationBody:
        fields = Fields(
            decode(data, MAX_DOCUMENT),
            "attestation.body",
            {"v", "platform", "simulated", "measurement", "purpose", "key", "key_id", "issued_at", "expires_at", "model"},
            frozenset({"dev_mode"}),
            version=PROTOCOL_VERSION,
        )
        body = cls(
            platform=fields.string("platform", 32, PLATFORMS),
            simulated=fields.boolean("simulated"),
            measurement=fields.binary("measurement", size=32),
            purpose=fields.string("purpose", 16, PURPOSES),
            key=fields.binary("key", size=crypto.KEY_SIZE),
            issued_at=fields.integer("issued_at", 0, 2**40),
            expires_at=fields.integer("expires_at", 0, 2**40),
            model=fields.string("model", 256),
            dev_mode=fields.boolean("dev_mode") if fields.has("dev_mode") else False,
        )
        if not crypto.constant_time_equal(fields.binary("key_id", size=KEY_ID_SIZE), key_id_for(body.key)):
            raise DecodeError("inconsistent", "attestation key_id does not match its key")
        return body

    @property
    def key_id(self) -> bytes:
        return key_id_for(self.key)

    def __repr__(self) -> str:
        return f"AttestationBody(platform={self.platform}, purpose={self.purpose}, key_id={self.key_id.hex()})"


@dataclass(frozen=True, repr=False)
class ReleaseEvidence:
    """Proof that a measurement is in the release transparency log.

    `leaf` is the release record, `proof` its inclusion proof and
    `tree_head` the log's signed tree head the proof leads to. The wire forms
    are those of schemas/transparency.py. None of it needs the platform's
    signature, because the log's own signature authenticates it.
    """

    leaf: bytes
    proof: bytes
    tree_head: bytes

    def to_map(self) -> dict[str, bytes]:
        return {"leaf": self.leaf, "proof": self.proof, "tree_head": self.tree_head}

    @classmethod
    def from_map(cls, value: object) -> ReleaseEvidence:
        fields = Fields(value, "attestation.release", {"leaf", "proof", "tree_head"})
        return cls(
            fields.binary("leaf", min_size=1, max_size=1024),
            fields.binary("proof", min_size=1, max_size=MAX_DOCUMENT),
            fields.binary("tree_head", min_size=1, max_size=1024),
        )


@dataclass(frozen=True, repr=False)
class SignedDocument:
    """A signed attestation body: the platform's signature over the body bytes.

    `release`, when present, carries the transparency log evidence for the
    body's measurement.
    """

    body: bytes
    signature: bytes
    release: ReleaseEvidence | None = None

    def to_wire(self) -> bytes:
        document: dict[str, object] = {"v": PROTOCOL_VERSION, "type": "attestation", "body": self.body, "sig": self.signature}
        if self.release is not None:
            document["release"] = self.release.to_map()
        return encode(document)

    @classmethod
    def from_wire(cls, data: bytes) -> SignedDocument:
        fields = Fields(decode(data, MAX_DOCUMENT), "attestation", {"v", "type", "body", "sig"}, frozenset({"release"}), version=PROTOCOL_VERSION)
        fields.string("type", choices=frozenset({"attestation"}))
        release = ReleaseEvidence.from_map(fields.raw("release")) if fields.has("release") else None
        return cls(fields.binary("body", min_size=1, max_size=MAX_DOCUMENT), fields.binary("sig", size=crypto.SIGNATURE_SIZE), release)

    def __repr__(self) -> str:
        return f"SignedDocument(body=[{len(self.body)} bytes], release={'yes' if self.release else 'no'})"


@dataclass(frozen=True, repr=False)
class KeyRelease:
    """A pool member's response to a join request: its live pool key epochs sealed to the joiner.

    The sealed plaintext is workers/epochs.py's release payload.
    """

    sealed: bytes

    def to_wire(self) -> bytes:
        return encode({"v": PROTOCOL_VERSION, "type": "key_release", "sealed": self.sealed})

    @classmethod
    def from_wire(cls, data: bytes) -> KeyRelease:
        fields = Fields(decode(data, MAX_DOCUMENT), "key_release", {"v", "type", "sealed"}, version=PROTOCOL_VERSION)
        fields.string("type", choices=frozenset({"key_release"}))
        return cls(fields.binary("sealed", min_size=crypto.SEAL_OVERHEAD + 1, max_size=MAX_DOCUMENT))

    def __repr__(self) -> str:
        return "KeyRelease(sealed=[...])"
