"""The implementation reproduces schemas/test-vectors.json from the inputs in the file.

Each test reads the inputs of one vector, recomputes its outputs with
confide's own code and compares every byte. Where a value has a simple
definition, it is also rebuilt independently (hashlib's BLAKE2b, msgpack bytes
written out by hand), so a bug shared by the generator and the code it calls
cannot hide.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files

import msgpack
import pytest

from confide.errors import AttestationError
from confide.schemas import crypto, reply_keys, subjects, vectors
from confide.schemas.attestation import TrustPolicy, verify_document
from confide.schemas.hardware import HardwareDocument
from confide.schemas.messages import (
    AttestationBody,
    ChunkBody,
    JobEnvelope,
    JobRequest,
    KeyRelease,
    ReplyChunk,
    SignedDocument,
    chunk_associated_data,
    key_id_for,
)
from confide.schemas.sev_snp import SnpTrustPolicy
from confide.workers.epochs import Epoch, EpochRing
from confide.workers.pool_key import REFUSAL
from sev_snp_fakes import LAUNCH_MEASUREMENT, TCB, make_amd_root


def load_vectors() -> dict:
    return json.loads(files("confide.schemas").joinpath("test-vectors.json").read_text(encoding="utf-8"))


VECTORS = load_vectors()
REPLY_ATTEMPTS = VECTORS["reply"]["attempts"]
HARDWARE_CASES = VECTORS["hardware_attestation"]["cases"]


def unhex(values: dict, *names: str) -> list[bytes]:
    return [bytes.fromhex(values[name]) for name in names]


def blake2b_keyed(key: bytes, person: bytes, data: bytes = b"") -> bytes:
    """Keyed BLAKE2b-256 with personalization, computed by hashlib instead of libsodium."""
    return hashlib.blake2b(data, digest_size=32, key=key, person=person).digest()


def msgpack_bin(data: bytes) -> bytes:
    """msgpack bin 8 header and data, for values shorter than 256 bytes."""
    assert len(data) < 256
    return b"\xc4" + bytes([len(data)]) + data


def msgpack_small_uint(value: int) -> bytes:
    """msgpack positive fixint, for values below 128."""
    assert 0 <= value < 128
    return bytes([value])


def test_file_matches_generator():
    """The committed file is exactly what `python -m confide.schemas.vectors` prints."""
    committed = files("confide.schemas").joinpath("test-vectors.json").read_text(encoding="utf-8")

    assert committed == vectors.render(vectors.build())


@pytest.mark.parametrize("case", VECTORS["padding"], ids=lambda case: f"{case['kind']}-{len(case['data']) // 2}")
def test_padding_vector(case):
    """sodium_pad appends 0x80 and zeros to the padded size, and sodium_unpad removes them."""
    data, padded = unhex(case, "data", "padded")

    assert crypto.pad(data, case["padded_size"]) == padded
    assert padded == data + b"\x80" + bytes(case["padded_size"] - len(data) - 1)
    assert crypto.unpad(padded, case["unpad_block_size"]) == data


def test_job_plaintext_vector():
    """The job request encodes to the vector's msgpack bytes and pads to its bucket."""
    job = VECTORS["job"]
    inputs = job["inputs"]
    request = vectors.job_request({**inputs, **{name: bytes.fromhex(inputs[name]) for name in ("job_id", "reply_token", "client_public")}})
    plaintext, padded = unhex(job, "plaintext", "padded")
    by_hand = msgpack.packb(
        {
            "v": 1,
            "job_id": request.job_id,
            "reply_token": request.reply_token,
            "client_key": request.client_key,
            "ts": inputs["timestamp"],
            "messages": inputs["messages"],
            "params": inputs["params"],
        },
        use_bin_type=True,
    )

    assert by_hand == plaintext
    assert request.to_padded() == padded
    assert len(padded) == job["bucket"]
    assert padded == plaintext + b"\x80" + bytes(job["bucket"] - len(plaintext) - 1)


def test_job_plaintext_vector_decodes():
    """The padded vector decodes back to the job's inputs."""
    job = VECTORS["job"]
    inputs = job["inputs"]

    request = JobRequest.from_padded(bytes.fromhex(job["padded"]))

    assert request.job_id.hex() == inputs["job_id"]
    assert request.reply_token.hex() == inputs["reply_token"]
    assert request.client_key.hex() == inputs["client_public"]
    assert request.timestamp == inputs["timestamp"]
    assert [{"role": m.role, "content": m.content} for m in request.messages] == inputs["messages"]
    assert request.params.to_map() == inputs["params"]


def test_job_sealed_box_vector():
    """Sealing with the vector's ephemeral key gives its bytes: ephemeral_pk || crypto_box(m, nonce)."""
    job = VECTORS["job"]
    inputs = job["inputs"]
    pool_public, ephemeral_secret = unhex(inputs, "pool_public", "ephemeral_secret")
    padded, sealed, ephemeral_public = unhex(job, "padded", "sealed", "ephemeral_public")

    assert crypto.KeyPair(ephemeral_secret).public == ephemeral_public
    assert bytes.fromhex(job["seal_nonce"]) == hashlib.blake2b(ephemeral_public + pool_public, digest_size=24).digest()
    assert crypto.seal_with_ephemeral(padded, pool_public, ephemeral_secret) == sealed
    assert sealed[: crypto.KEY_SIZE] == ephemeral_public
    assert len(sealed) == len(padded) + crypto.SEAL_OVERHEAD


def test_job_sealed_box_opens_with_libsodium():
    """libsodium's crypto_box_seal_open, through crypto.unseal, opens the vector with the pool key."""
    job = VECTORS["job"]
    pool_secret, pool_public = unhex(job["inputs"], "pool_secret", "pool_public")
    pool = crypto.KeyPair(pool_secret)

    assert pool.public == pool_public
    assert crypto.unseal(bytes.fromhex(job["sealed"]), pool) == bytes.fromhex(job["padded"])


def test_job_envelope_vector():
    """The envelope carries key_id = BLAKE2b-64(pool key) and the sealed bytes, in the vector's encoding."""
    job = VECTORS["job"]
    pool_public, reply_token = unhex(job["inputs"], "pool_public", "reply_token")
    key_id, sealed, envelope = unhex(job, "key_id", "sealed", "envelope")

    assert key_id_for(pool_public) == key_id
    assert hashlib.blake2b(pool_public, digest_size=8, person=b"confide:keyid:v1").digest() == key_id
    assert JobEnvelope(key_id, sealed).to_wire() == envelope
    decoded = JobEnvelope.from_wire(envelope)
    assert (decoded.key_id, decoded.sealed) == (key_id, sealed)
    subject_token = hashlib.blake2b(reply_token, digest_size=16, person=b"confide:rsubj:v1").hexdigest()
    assert job["reply_subject"] == f"confide.reply.v1.{subject_token}.chunks"
    assert subjects.reply_subject(reply_token) == job["reply_subject"]


@pytest.mark.parametrize("attempt", REPLY_ATTEMPTS, ids=lambda attempt: f"attempt-{attempt['attempt']}")
def test_reply_key_schedule_vector(attempt):
    """X25519, the root and every chain and message key match the vector, by libsodium and by hashlib."""
    inputs = VECTORS["reply"]["inputs"]
    job_id, reply_token, client_secret, client_public = unhex(inputs, "job_id", "reply_token", "client_secret", "client_public")
    worker_secret, worker_public, shared, root = unhex(attempt, "worker_secret", "worker_public", "shared_secret", "root")
    root_input = b"\x95" + b"".join(map(msgpack_bin, [client_public, worker_public, job_id, reply_token])) + msgpack_small_uint(attempt["attempt"])

    assert crypto.KeyPair(worker_secret).public == worker_public
    assert crypto.x25519(worker_secret, client_public) == shared
    assert crypto.x25519(client_secret, worker_public) == shared
    assert bytes.fromhex(attempt["root_input"]) == root_input
    assert reply_keys.derive_root(shared, client_public, worker_public, job_id, reply_token, attempt["attempt"]) == root
    assert blake2b_keyed(shared, reply_keys.ROOT_PERSON, root_input) == root

    chain_key = root
    for chunk in attempt["chunks"]:
        assert bytes.fromhex(chunk["chain_key"]) == chain_key
        assert crypto.kdf(chain_key, reply_keys.MESSAGE_KEY_PERSON) == bytes.fromhex(chunk["message_key"])
        assert blake2b_keyed(chain_key, b"confide:msgkey:1") == bytes.fromhex(chunk["message_key"])
        chain_key = blake2b_keyed(chain_key, b"confide:chain:v1")
    assert bytes.fromhex(attempt["next_chain_key"]) == chain_key


@pytest.mark.parametrize(("name", "position"), [("reply", 0), ("reply", 1), ("error_reply", 0)])
def test_reply_chunk_encryption_vector(name, position):
    """A sender with the vector's worker key produces the vector's bodies, associated data and chunks."""
    vector = VECTORS[name]
    attempt = vector["attempts"][position]
    job_id, reply_token, client_public = unhex(vector["inputs"], "job_id", "reply_token", "client_public")
    worker_public = bytes.fromhex(attempt["worker_public"])
    sender = reply_keys.ReplySender(job_id, reply_token, client_public, attempt["attempt"], crypto.KeyPair(bytes.fromhex(attempt["worker_secret"])))

    for chunk in attempt["chunks"]:
        body = ChunkBody(**chunk["body"])
        associated_data = (
            b"\x96\x01\xa5chunk"
            + msgpack_small_uint(attempt["attempt"])
            + msgpack_small_uint(chunk["index"])
            + (b"\xc3" if chunk["final"] else b"\xc2")
            + msgpack_bin(worker_public)
        )
        plaintext = msgpack.packb(chunk["body"], use_bin_type=True)

        assert bytes.fromhex(chunk["body_plaintext"]) == plaintext
        assert body.to_padded() == bytes.fromhex(chunk["body_padded"])
        assert bytes.fromhex(chunk["associated_data"]) == associated_data
        assert chunk_associated_data(attempt["attempt"], chunk["index"], chunk["final"], worker_public) == associated_data
        message_key = bytes.fromhex(chunk["message_key"])
        assert crypto.aead_encrypt(message_key, body.to_padded(), associated_data) == bytes.fromhex(chunk["ciphertext"])
        assert sender.seal(body, final=chunk["final"]).to_wire() == bytes.fromhex(chunk["wire"])


def test_reply_chunks_decrypt_across_attempts():
    """A receiver opens both attempts in order, and attempt 2 begins with a restart and ends the reply."""
    inputs = VECTORS["reply"]["inputs"]
    job_id, reply_token, client_secret = unhex(inputs, "job_id", "reply_token", "client_secret")
    receiver = reply_keys.ReplyReceiver(job_id, reply_token, crypto.KeyPair(client_secret))

    opened = []
    for attempt in REPLY_ATTEMPTS:
        for chunk in attempt["chunks"]:
            wire = bytes.fromhex(chunk["wire"])
            decrypted = crypto.aead_decrypt(bytes.fromhex(chunk["message_key"]), ReplyChunk.from_wire(wire).ciphertext, bytes.fromhex(chunk["associated_data"]))
            assert decrypted == bytes.fromhex(chunk["body_padded"])
            result = receiver.open(ReplyChunk.from_wire(wire))
            assert result is not None
            assert result.body == ChunkBody(**chunk["body"])
            opened.append(result)

    assert [result.restarted for result in opened] == [False, False, True, False, False]
    assert opened[-1].final
    assert receiver.complete


def test_error_reply_vector_decrypts():
    """The error reply opens to a final chunk with finish "error" and its code and detail."""
    vector = VECTORS["error_reply"]
    job_id, reply_token, client_secret = unhex(vector["inputs"], "job_id", "reply_token", "client_secret")
    receiver = reply_keys.ReplyReceiver(job_id, reply_token, crypto.KeyPair(client_secret))
    (chunk,) = vector["attempts"][0]["chunks"]

    result = receiver.open(ReplyChunk.from_wire(bytes.fromhex(chunk["wire"])))

    assert result is not None
    assert result.final
    assert result.body.finish == "error"
    assert result.body.error == "prompt_too_long"
    assert result.body.detail == chunk["body"]["detail"]


def test_attestation_vector():
    """The body encodes to the vector's bytes, the Ed25519 signature matches and the document verifies."""
    vector = VECTORS["attestation"]
    inputs = vector["inputs"]
    seed, verify_key, measurement, key = unhex(inputs, "platform_seed", "platform_verify_key", "measurement", "key")
    body, signature, document = unhex(vector, "body", "signature", "document")
    fields = {name: inputs[name] for name in ("platform", "simulated", "purpose", "issued_at", "expires_at", "model")}

    platform = crypto.SigningKey(seed)
    assert platform.verify_key == verify_key
    assert AttestationBody(measurement=measurement, key=key, **fields).to_bytes() == body
    assert platform.sign(body) == signature
    assert SignedDocument(body, signature).to_wire() == document
    assert AttestationBody.from_bytes(body).key_id.hex() == vector["key_id"]

    policy = TrustPolicy({"simulated": verify_key}, frozenset({measurement}), allow_simulated=True)
    verified = verify_document(document, policy, purpose="pool", now=inputs["issued_at"] + 60)
    assert verified.key == key


@pytest.mark.parametrize("case", HARDWARE_CASES, ids=lambda case: "dev" if case["inputs"]["dev_mode"] else "production")
def test_hardware_report_data_vector(case):
    """The report data is BLAKE2b-512 over the msgpack claims array, rebuilt here with msgpack and hashlib."""
    inputs = case["inputs"]
    key, measurement = unhex(inputs, "key", "measurement")
    claims = [
        "confide-report-data",
        1,
        inputs["platform"],
        inputs["purpose"],
        key,
        measurement,
        inputs["model"],
        inputs["issued_at"],
        inputs["expires_at"],
        inputs["dev_mode"],
    ]
    report_data_input = msgpack.packb(claims, use_bin_type=True)
    report_data = hashlib.blake2b(report_data_input, digest_size=64, person=b"confide:rdata:v1").digest()

    assert report_data_input[:1] == b"\x9a"
    assert report_data_input[-1:] == (b"\xc3" if inputs["dev_mode"] else b"\xc2")
    assert bytes.fromhex(case["report_data_input"]) == report_data_input
    assert bytes.fromhex(case["report_data"]) == report_data


@pytest.mark.parametrize("case", HARDWARE_CASES, ids=lambda case: "dev" if case["inputs"]["dev_mode"] else "production")
def test_hardware_document_vector(case):
    """The document encodes to the vector's bytes, written here field by field, and decodes back to its claims."""
    inputs = case["inputs"]
    key, measurement, report = unhex(inputs, "key", "measurement", "report")
    key_id = hashlib.blake2b(key, digest_size=8, person=b"confide:keyid:v1").digest()
    by_hand = {
        "v": 1,
        "type": "hardware_attestation",
        "platform": inputs["platform"],
        "provider": case["provider"],
        "purpose": inputs["purpose"],
        "key": key,
        "key_id": key_id,
        "measurement": measurement,
        "model": inputs["model"],
        "issued_at": inputs["issued_at"],
        "expires_at": inputs["expires_at"],
        "report": report,
        "certs": [],
    }
    if inputs["dev_mode"]:
        by_hand["dev_mode"] = True
    document = bytes.fromhex(case["document"])
    fields = {name: inputs[name] for name in ("platform", "purpose", "model", "issued_at", "expires_at", "dev_mode")}

    assert case["provider"] == {"sev-snp": "sev_guest", "tdx": "tdx_guest"}[inputs["platform"]]
    assert bytes.fromhex(case["key_id"]) == key_id
    assert msgpack.packb(by_hand, use_bin_type=True) == document
    assert HardwareDocument(key=key, measurement=measurement, report=report, **fields).to_wire() == document
    decoded = HardwareDocument.from_wire(document)
    assert decoded.report_data() == bytes.fromhex(case["report_data"])
    assert decoded.key == key
    assert decoded.report == report
    assert decoded.certificates == ()
    assert decoded.dev_mode is inputs["dev_mode"]


def test_hardware_document_vector_never_verifies():
    """The vector's document is rejected without a pinned AMD root, and its dummy report fails the layout check with one."""
    case = HARDWARE_CASES[0]
    document = bytes.fromhex(case["document"])
    measurement = bytes.fromhex(case["inputs"]["measurement"])
    now = case["inputs"]["issued_at"] + 60
    snp_policy = SnpTrustPolicy(ark=make_amd_root().ark, launch_measurements=frozenset({LAUNCH_MEASUREMENT}), minimum_tcb=TCB)

    with pytest.raises(AttestationError, match="pins no AMD root"):
        verify_document(document, TrustPolicy({}, frozenset({measurement})), purpose="pool", now=now)
    with pytest.raises(AttestationError, match="is 32 bytes, expected 1184"):
        verify_document(document, TrustPolicy({}, frozenset({measurement}), sev_snp=snp_policy), purpose="pool", now=now)


def test_key_release_payload_vector():
    """The payload is the member's epochs as msgpack, and EpochRing.to_release writes the same bytes."""
    vector = VECTORS["key_release"]
    inputs = vector["inputs"]
    pool_public, previous_public, erased_secret, erased_key_id = unhex(inputs, "pool_public", "previous_public", "erased_secret", "erased_key_id")
    previous_epoch, current_epoch = inputs["epochs"]
    by_hand = msgpack.packb(
        {
            "current": hashlib.blake2b(pool_public, digest_size=8, person=b"confide:keyid:v1").digest(),
            "epochs": [
                {"secret": bytes.fromhex(epoch["secret"]), "created_at": epoch["created_at"], "erase_at": epoch["erase_at"]}
                for epoch in inputs["epochs"]
            ],
            "erased": [erased_key_id],
        },
        use_bin_type=True,
    )
    payload = bytes.fromhex(vector["payload"])
    assert by_hand == payload
    assert key_id_for(crypto.KeyPair(erased_secret).public) == erased_key_id

    # Rebuild the member's ring in time order. The previous epoch replaces the
    # oldest one, which is erased when its grace period ends. The current
    # epoch then replaces the previous one and starts its grace period.
    grace_s = inputs["key_grace_s"]
    erased_created_at = previous_epoch["created_at"] - (current_epoch["created_at"] - previous_epoch["created_at"])
    ring = EpochRing(grace_s=grace_s, remember_s=24 * 3600)
    ring.install(Epoch(crypto.KeyPair(erased_secret), erased_created_at), erased_created_at, current=True)
    ring.install(Epoch(crypto.KeyPair(bytes.fromhex(previous_epoch["secret"])), previous_epoch["created_at"]), previous_epoch["created_at"], current=True)
    assert ring.expire(previous_epoch["created_at"] + grace_s) == [erased_key_id]
    ring.install(Epoch(crypto.KeyPair(bytes.fromhex(current_epoch["secret"])), current_epoch["created_at"]), current_epoch["created_at"], current=True)

    assert previous_epoch["erase_at"] == current_epoch["created_at"] + grace_s
    assert ring.current.keys.public == pool_public
    assert ring.keys_for(key_id_for(previous_public)) is not None
    assert ring.to_release() == payload


def test_key_release_vector():
    """The payload is sealed to the joiner, libsodium opens it, and the joiner's ring makes the attested key current."""
    vector = VECTORS["key_release"]
    inputs = vector["inputs"]
    pool_public, previous_public, erased_key_id, joiner_secret, ephemeral_secret = unhex(
        inputs, "pool_public", "previous_public", "erased_key_id", "joiner_secret", "ephemeral_secret"
    )
    joiner = crypto.KeyPair(joiner_secret)
    payload, sealed, message = unhex(vector, "payload", "sealed", "message")

    assert joiner.public.hex() == inputs["joiner_public"]
    assert crypto.seal_with_ephemeral(payload, joiner.public, ephemeral_secret) == sealed
    assert KeyRelease(sealed).to_wire() == message
    released = crypto.unseal(KeyRelease.from_wire(message).sealed, joiner)
    assert released == payload

    ring = EpochRing(grace_s=inputs["key_grace_s"], remember_s=24 * 3600)
    ring.merge_release(released, now=vectors.JOB_TIMESTAMP)
    assert ring.current is not None
    assert ring.current.key_id == key_id_for(pool_public)
    assert ring.keys_for(key_id_for(pool_public)).public == pool_public
    assert ring.keys_for(key_id_for(previous_public)).public == previous_public
    assert ring.is_erased(erased_key_id)
    assert bytes.fromhex(vector["refusal"]) == REFUSAL
