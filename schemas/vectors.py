"""Known-answer test vectors for protocol version 1.

    python -m confide.schemas.vectors > schemas/test-vectors.json

rebuilds the committed file. Every input (keys, ids, timestamps, the sealing
ephemeral key) is a fixed value in this module, so the output is identical on
every run: a changed output means the wire format changed. The keys are
BLAKE2b-256 digests of readable labels, chosen only so that they are
arbitrary and reproducible; the label is not part of the protocol.

In the JSON, every byte string is lowercase hex. Text that travels inside a
message (prompts, reply text, model names) is a JSON string.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from confide.schemas import crypto, reply_keys, subjects
from confide.schemas.codec import encode
from confide.schemas.hardware import HardwareDocument, report_data_for
from confide.schemas.messages import (
    CHUNK_PAD_BLOCK,
    PROTOCOL_VERSION,
    AttestationBody,
    ChatMessage,
    ChunkBody,
    GenerationParams,
    JobEnvelope,
    JobRequest,
    KeyRelease,
    SignedDocument,
    bucket_for,
    chunk_associated_data,
    key_id_for,
)

VECTORS_VERSION = 1

# 2026-01-01T00:00:00Z: a multiple of 60, as the reference client rounds timestamps.
JOB_TIMESTAMP = 1767225600
# The pool key epochs of the key release vector: the current one was created
# when the attestation vector was issued, each epoch lasts an hour, and a
# replaced key stays usable for an hour (the reference worker's defaults).
EPOCH_LENGTH_S = 3600
KEY_GRACE_S = 3600
# A placeholder for a raw hardware report. It is not a valid report of any
# platform, so a document that carries it decodes but never verifies.
DUMMY_REPORT = b"\x5a" * 32


def fixed_bytes(label: str, size: int = 32) -> bytes:
    """Return `size` arbitrary but reproducible bytes named by `label`."""
    return hashlib.blake2b(label.encode("ascii"), digest_size=size).digest()


def build() -> dict[str, Any]:
    """Compute every vector from the fixed inputs."""
    return {
        "protocol_version": PROTOCOL_VERSION,
        "vectors_version": VECTORS_VERSION,
        "encoding": "byte strings are lowercase hex; text carried inside messages is a JSON string",
        "padding": padding_vectors(),
        "job": job_vector(),
        "reply": reply_vector(),
        "error_reply": error_reply_vector(),
        "attestation": attestation_vector(),
        "hardware_attestation": hardware_attestation_vector(),
        "key_release": key_release_vector(),
    }


def padding_vectors() -> list[dict[str, Any]]:
    """sodium_pad at the size boundaries of job buckets and chunk blocks.

    The 0x80 marker always takes one byte, so data that fills a bucket or a
    block exactly moves to the next one.
    """
    vectors = []
    for kind, size in [("job", 0), ("job", 5), ("job", 1023), ("job", 1024), ("chunk", 0), ("chunk", 63), ("chunk", 64)]:
        data = (fixed_bytes(f"padding data {size}", 64) * (size // 64 + 1))[:size]
        if kind == "job":
            padded_size, unpad_block_size = bucket_for(size), bucket_for(size)
        else:
            padded_size, unpad_block_size = chunk_padded_size(size), CHUNK_PAD_BLOCK
        vectors.append(
            {
                "kind": kind,
                "data": data.hex(),
                "padded_size": padded_size,
                "unpad_block_size": unpad_block_size,
                "padded": crypto.pad(data, padded_size).hex(),
            }
        )
    return vectors


def chunk_padded_size(size: int) -> int:
    """Return the padded size of a chunk body: the data and the marker byte, rounded up to the block."""
    return (size + 1 + CHUNK_PAD_BLOCK - 1) // CHUNK_PAD_BLOCK * CHUNK_PAD_BLOCK


def seal_nonce(ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    """Return crypto_box_seal's nonce: unkeyed BLAKE2b-192 of ephemeral_pk || recipient_pk."""
    return hashlib.blake2b(ephemeral_public + recipient_public, digest_size=24).digest()


def job_inputs() -> dict[str, Any]:
    client = crypto.KeyPair(fixed_bytes("client secret key"))
    pool = crypto.KeyPair(fixed_bytes("pool secret key"))
    return {
        "job_id": fixed_bytes("job id", 16),
        "reply_token": fixed_bytes("reply token"),
        "client_secret": client.secret,
        "client_public": client.public,
        "timestamp": JOB_TIMESTAMP,
        "messages": [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "नमस्ते! What is a sealed box? 🙂"},
        ],
        "params": {"max_tokens": 128, "temperature": 0.5, "top_p": 0.9, "seed": 7},
        "pool_secret": pool.secret,
        "pool_public": pool.public,
        "ephemeral_secret": fixed_bytes("job sealing ephemeral secret key"),
    }


def job_request(inputs: dict[str, Any]) -> JobRequest:
    params = inputs["params"]
    return JobRequest(
        job_id=inputs["job_id"],
        reply_token=inputs["reply_token"],
        client_key=inputs["client_public"],
        timestamp=inputs["timestamp"],
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in inputs["messages"]),
        params=GenerationParams(params["max_tokens"], params["temperature"], params["top_p"], params.get("seed")),
    )


def job_vector() -> dict[str, Any]:
    inputs = job_inputs()
    request = job_request(inputs)
    plaintext = request_plaintext(request)
    padded = request.to_padded()
    ephemeral_public = crypto.KeyPair(inputs["ephemeral_secret"]).public
    sealed = crypto.seal_with_ephemeral(padded, inputs["pool_public"], inputs["ephemeral_secret"])
    key_id = key_id_for(inputs["pool_public"])

    return {
        "note": "a job request, msgpack-encoded, padded to its bucket, sealed to the pool key and wrapped in the envelope",
        "inputs": _hex_values(inputs),
        "plaintext": plaintext.hex(),
        "bucket": bucket_for(len(plaintext)),
        "padded": padded.hex(),
        "ephemeral_public": ephemeral_public.hex(),
        "seal_nonce": seal_nonce(ephemeral_public, inputs["pool_public"]).hex(),
        "sealed": sealed.hex(),
        "key_id": key_id.hex(),
        "envelope": JobEnvelope(key_id, sealed).to_wire().hex(),
        "reply_subject": subjects.reply_subject(inputs["reply_token"]),
    }


def request_plaintext(request: JobRequest) -> bytes:
    """Return the msgpack bytes that JobRequest.to_padded pads, without the padding."""
    padded = request.to_padded()
    return crypto.unpad(padded, len(padded))


def reply_vector() -> dict[str, Any]:
    """Two delivery attempts of one job: attempt 1 stops after two chunks, attempt 2 completes."""
    job = job_inputs()
    attempts = [
        (1, fixed_bytes("worker secret key, attempt 1"), [ChunkBody("Hello"), ChunkBody(", world")], False),
        (
            2,
            fixed_bytes("worker secret key, attempt 2"),
            [ChunkBody("नमस्ते"), ChunkBody(" 🙂"), ChunkBody("", "stop", prompt_tokens=42, completion_tokens=3)],
            True,
        ),
    ]
    return {
        "note": "attempt 1 was interrupted before its final chunk; the client discards its text when attempt 2 begins",
        "inputs": _hex_values(
            {
                "job_id": job["job_id"],
                "reply_token": job["reply_token"],
                "client_secret": job["client_secret"],
                "client_public": job["client_public"],
            }
        ),
        "attempts": [
            attempt_vector(job["job_id"], job["reply_token"], job["client_public"], attempt, worker_secret, bodies, last_is_final)
            for attempt, worker_secret, bodies, last_is_final in attempts
        ],
    }


def error_reply_vector() -> dict[str, Any]:
    """An error reply: one final chunk with finish "error", for a job of its own."""
    client = crypto.KeyPair(fixed_bytes("error reply client secret key"))
    job_id = fixed_bytes("error reply job id", 16)
    reply_token = fixed_bytes("error reply token")
    detail = "the prompt is 20480 tokens but the model's context holds 4096; shorten it"
    body = ChunkBody("", "error", error="prompt_too_long", detail=detail)
    return {
        "note": "the worker could read the reply token but rejected the job, so it answered with one authenticated final chunk",
        "inputs": _hex_values({"job_id": job_id, "reply_token": reply_token, "client_secret": client.secret, "client_public": client.public}),
        "attempts": [
            attempt_vector(job_id, reply_token, client.public, 1, fixed_bytes("error reply worker secret key"), [body], True),
        ],
    }


def attempt_vector(
    job_id: bytes,
    reply_token: bytes,
    client_public: bytes,
    attempt: int,
    worker_secret: bytes,
    bodies: list[ChunkBody],
    last_is_final: bool,
) -> dict[str, Any]:
    worker = crypto.KeyPair(worker_secret)
    shared = crypto.x25519(worker_secret, client_public)
    root_input = encode([client_public, worker.public, job_id, reply_token, attempt])
    root = reply_keys.derive_root(shared, client_public, worker.public, job_id, reply_token, attempt)
    # ReplySender erases the key pair it is given, so it gets its own copy.
    sender = reply_keys.ReplySender(job_id, reply_token, client_public, attempt, crypto.KeyPair(worker_secret))

    chunks = []
    chain_key = root
    for index, body in enumerate(bodies):
        final = last_is_final and index == len(bodies) - 1
        message_key = crypto.kdf(chain_key, reply_keys.MESSAGE_KEY_PERSON)
        chunk = sender.seal(body, final=final)
        padded = body.to_padded()
        chunks.append(
            {
                "index": index,
                "final": final,
                "body": _body_fields(body),
                "body_plaintext": crypto.unpad(padded, CHUNK_PAD_BLOCK).hex(),
                "body_padded": padded.hex(),
                "chain_key": chain_key.hex(),
                "message_key": message_key.hex(),
                "associated_data": chunk_associated_data(attempt, index, final, worker.public).hex(),
                "ciphertext": chunk.ciphertext.hex(),
                "wire": chunk.to_wire().hex(),
            }
        )
        chain_key = crypto.kdf(chain_key, reply_keys.CHAIN_PERSON)

    return {
        "attempt": attempt,
        "worker_secret": worker_secret.hex(),
        "worker_public": worker.public.hex(),
        "shared_secret": shared.hex(),
        "root_input": root_input.hex(),
        "root": root.hex(),
        "chunks": chunks,
        # The chain key after the last chunk; a sender that finishes erases it.
        "next_chain_key": chain_key.hex(),
    }


def _body_fields(body: ChunkBody) -> dict[str, Any]:
    fields: dict[str, Any] = {"text": body.text}
    if body.finish is not None:
        fields.update(finish=body.finish, prompt_tokens=body.prompt_tokens, completion_tokens=body.completion_tokens)
    if body.error is not None:
        fields.update(error=body.error, detail=body.detail)
    return fields


def attestation_vector() -> dict[str, Any]:
    """A simulated platform's signed document binding the pool key of the job vector."""
    platform = crypto.SigningKey(fixed_bytes("simulated platform signing seed"))
    pool_public = crypto.KeyPair(fixed_bytes("pool secret key")).public
    fields = {
        "platform": "simulated",
        "simulated": True,
        "measurement": fixed_bytes("measurement"),
        "purpose": "pool",
        "key": pool_public,
        "issued_at": JOB_TIMESTAMP - 600,
        "expires_at": JOB_TIMESTAMP + 3000,
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
    }
    body = AttestationBody(**fields).to_bytes()
    signature = platform.sign(body)
    return {
        "note": "Ed25519 (RFC 8032) signature over the exact body bytes; the body is carried as a msgpack bin",
        "inputs": _hex_values({"platform_seed": platform.seed, "platform_verify_key": platform.verify_key, **fields}),
        "key_id": key_id_for(pool_public).hex(),
        "body": body.hex(),
        "signature": signature.hex(),
        "document": SignedDocument(body, signature).to_wire().hex(),
    }


def hardware_attestation_vector() -> dict[str, Any]:
    """Build an SEV-SNP document's claims, the report data that binds them and the document's bytes."""
    pool_public = crypto.KeyPair(fixed_bytes("pool secret key")).public
    claims = {
        "platform": "sev-snp",
        "purpose": "pool",
        "key": pool_public,
        "measurement": fixed_bytes("measurement"),
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "issued_at": JOB_TIMESTAMP - 600,
        "expires_at": JOB_TIMESTAMP + 3000,
    }
    return {
        "note": (
            "report_data = BLAKE2b-512, personalization confide:rdata:v1, over report_data_input; "
            "the report is a 32-byte dummy, so the documents decode but no verifier accepts them"
        ),
        "cases": [hardware_attestation_case(claims, dev_mode) for dev_mode in (False, True)],
    }


def hardware_attestation_case(claims: dict[str, Any], dev_mode: bool) -> dict[str, Any]:
    report_data_input = encode(
        [
            "confide-report-data",
            PROTOCOL_VERSION,
            claims["platform"],
            claims["purpose"],
            claims["key"],
            claims["measurement"],
            claims["model"],
            claims["issued_at"],
            claims["expires_at"],
            dev_mode,
        ]
    )
    document = HardwareDocument(**claims, report=DUMMY_REPORT, certificates=(), dev_mode=dev_mode)
    return {
        "inputs": _hex_values({**claims, "dev_mode": dev_mode, "report": DUMMY_REPORT, "certs": []}),
        "provider": document.provider,
        "key_id": document.key_id.hex(),
        "report_data_input": report_data_input.hex(),
        "report_data": report_data_for(**claims, dev_mode=dev_mode).hex(),
        "document": document.to_wire().hex(),
    }


def key_release_vector() -> dict[str, Any]:
    """Build a pool member's response to a join request: its pool key epochs sealed to the joiner's one-time key.

    The member has the current epoch (the pool key of the job vector), the
    epoch it replaced, still in its grace period, and the key id of an older
    epoch it has erased.
    """
    pool = crypto.KeyPair(fixed_bytes("pool secret key"))
    previous = crypto.KeyPair(fixed_bytes("previous pool secret key"))
    erased = crypto.KeyPair(fixed_bytes("erased pool secret key"))
    joiner = crypto.KeyPair(fixed_bytes("joining worker one-time secret key"))
    ephemeral_secret = fixed_bytes("key release sealing ephemeral secret key")

    current_created_at = JOB_TIMESTAMP - 600
    previous_created_at = current_created_at - EPOCH_LENGTH_S
    epochs = [
        {"secret": previous.secret, "created_at": previous_created_at, "erase_at": current_created_at + KEY_GRACE_S},
        {"secret": pool.secret, "created_at": current_created_at, "erase_at": None},
    ]
    payload = encode({"current": key_id_for(pool.public), "epochs": epochs, "erased": [key_id_for(erased.public)]})
    sealed = crypto.seal_with_ephemeral(payload, joiner.public, ephemeral_secret)
    return {
        "note": (
            "the joiner opens `sealed` with its one-time key, reads the payload, and checks that one of its "
            "epochs has the key id of the attested pool key; erased epochs travel as key ids only"
        ),
        "inputs": {
            **_hex_values(
                {
                    "pool_secret": pool.secret,
                    "pool_public": pool.public,
                    "previous_secret": previous.secret,
                    "previous_public": previous.public,
                    "erased_secret": erased.secret,
                    "erased_public": erased.public,
                    "erased_key_id": key_id_for(erased.public),
                    "joiner_secret": joiner.secret,
                    "joiner_public": joiner.public,
                    "ephemeral_secret": ephemeral_secret,
                }
            ),
            "key_grace_s": KEY_GRACE_S,
            "epochs": [_hex_values(epoch) for epoch in epochs],
        },
        "payload": payload.hex(),
        "sealed": sealed.hex(),
        "message": KeyRelease(sealed).to_wire().hex(),
        "refusal": encode({"v": PROTOCOL_VERSION, "type": "key_release_refused"}).hex(),
    }


def _hex_values(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value.hex() if isinstance(value, bytes) else value for name, value in values.items()}


def render(vectors: dict[str, Any]) -> str:
    """Serialize as the committed file is written: two-space indent, UTF-8 text kept readable."""
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.reconfigure(encoding="utf-8")
    sys.stdout.write(render(build()))


if __name__ == "__main__":
    main()
