"""Property-based tests of every decoder in schemas/messages.py and of codec.decode.

Three properties are checked. No input, random or structurally plausible,
makes a decoder raise anything but DecodeError. Every valid message survives
an encode and decode round trip unchanged. One changed byte anywhere in a
sealed chunk or a sealed job is rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sev_snp_fakes import make_amd_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.errors import AttestationError, AuthenticationError, DecodeError, ReplyOrderError
from confide.schemas import codec, crypto
from confide.schemas.attestation import TrustPolicy, verify_document
from confide.schemas.codec import encode
from confide.schemas.hardware import HARDWARE_PLATFORMS, HardwareDocument
from confide.schemas.messages import (
    CHUNK_PAD_BLOCK,
    FINISH_REASONS,
    JOB_ID_SIZE,
    KEY_ID_SIZE,
    MAX_MAX_TOKENS,
    PAD_BUCKETS,
    PLATFORMS,
    PURPOSES,
    REPLY_TOKEN_SIZE,
    ROLES,
    AttestationBody,
    ChatMessage,
    ChunkBody,
    GenerationParams,
    JobEnvelope,
    JobRequest,
    KeyRelease,
    ReplyChunk,
    SignedDocument,
    bucket_for,
    key_id_for,
)
from confide.schemas.reply_keys import ReplyReceiver, ReplySender
from confide.schemas.sev_snp import SnpTrustPolicy, TcbVersion

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def pad_job(plaintext: bytes) -> bytes:
    return crypto.pad(plaintext, bucket_for(len(plaintext)))


def pad_chunk(plaintext: bytes) -> bytes:
    return crypto.pad(plaintext, (len(plaintext) + CHUNK_PAD_BLOCK) // CHUNK_PAD_BLOCK * CHUNK_PAD_BLOCK)


# Each decoder under test, as a function of the bytes it reads from the network.
DECODERS: dict[str, Callable[[bytes], object]] = {
    "job_envelope": JobEnvelope.from_wire,
    "job_payload": JobRequest.from_padded,
    "reply_chunk": ReplyChunk.from_wire,
    "chunk_body_final": lambda data: ChunkBody.from_padded(data, final=True),
    "chunk_body_not_final": lambda data: ChunkBody.from_padded(data, final=False),
    "attestation_body": AttestationBody.from_bytes,
    "attestation_document": SignedDocument.from_wire,
    "hardware_document": HardwareDocument.from_wire,
    "key_release": KeyRelease.from_wire,
    "generation_params": lambda data: GenerationParams.from_map(codec.decode(data, 4096)),
    "codec": lambda data: codec.decode(data, 64 * 1024),
}


def decodes_or_raises_decode_error(decoder: Callable[[bytes], object], data: bytes) -> None:
    """Call the decoder, so that any exception other than DecodeError fails the test with its type."""
    try:
        decoder(data)
    except DecodeError as exc:
        assert exc.reason, "a DecodeError must carry a reason to count"


# -- strategies -------------------------------------------------------------------

msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=80),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children, max_size=5)),
    max_leaves=12,
)


def keys(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


bounded_text = st.text(max_size=200)
chat_messages = st.lists(
    st.builds(ChatMessage, role=st.sampled_from(sorted(ROLES)), content=bounded_text),
    min_size=1,
    max_size=4,
).map(tuple)
generation_params = st.builds(
    GenerationParams,
    max_tokens=st.integers(1, MAX_MAX_TOKENS),
    temperature=st.floats(0.0, 2.0),
    top_p=st.floats(0.0, 1.0),
    seed=st.none() | st.integers(0, 2**31 - 1),
)
job_requests = st.builds(
    JobRequest,
    job_id=keys(JOB_ID_SIZE),
    reply_token=keys(REPLY_TOKEN_SIZE),
    client_key=keys(crypto.KEY_SIZE),
    timestamp=st.integers(0, 2**40),
    messages=chat_messages,
    params=generation_params,
)
job_envelopes = st.builds(
    JobEnvelope,
    key_id=keys(KEY_ID_SIZE),
    sealed=st.sampled_from(PAD_BUCKETS[:3]).flatmap(lambda bucket: keys(bucket + crypto.SEAL_OVERHEAD)),
)
reply_chunks = st.builds(
    ReplyChunk,
    attempt=st.integers(1, 2**31),
    index=st.integers(0, 2**31),
    final=st.booleans(),
    worker_key=keys(crypto.KEY_SIZE),
    ciphertext=st.binary(min_size=crypto.AEAD_TAG_SIZE + CHUNK_PAD_BLOCK, max_size=400),
)
counts = st.integers(0, 2**31)
not_final_bodies = st.builds(ChunkBody, text=bounded_text)
final_bodies = st.one_of(
    st.builds(ChunkBody, text=bounded_text, finish=st.sampled_from(sorted(FINISH_REASONS - {"error"})), prompt_tokens=counts, completion_tokens=counts),
    st.builds(
        ChunkBody,
        text=bounded_text,
        finish=st.just("error"),
        prompt_tokens=counts,
        completion_tokens=counts,
        error=st.text(min_size=1, max_size=64).filter(lambda code: len(code.encode()) <= 64),
        detail=st.text(max_size=300),
    ),
)
attestation_bodies = st.builds(
    AttestationBody,
    platform=st.sampled_from(sorted(PLATFORMS)),
    simulated=st.booleans(),
    measurement=keys(32),
    purpose=st.sampled_from(sorted(PURPOSES)),
    key=keys(crypto.KEY_SIZE),
    issued_at=st.integers(0, 2**40),
    expires_at=st.integers(0, 2**40),
    model=st.text(max_size=60),
)
signed_documents = st.builds(SignedDocument, body=st.binary(min_size=1, max_size=600), signature=keys(crypto.SIGNATURE_SIZE))
hardware_documents = st.builds(
    HardwareDocument,
    platform=st.sampled_from(sorted(HARDWARE_PLATFORMS)),
    purpose=st.sampled_from(sorted(PURPOSES)),
    key=keys(crypto.KEY_SIZE),
    measurement=keys(32),
    model=st.text(max_size=40),
    issued_at=st.integers(0, 2**40),
    expires_at=st.integers(0, 2**40),
    report=st.binary(min_size=1, max_size=1200),
    certificates=st.lists(st.binary(min_size=1, max_size=200), max_size=3).map(tuple),
    dev_mode=st.booleans(),
)
key_releases = st.builds(KeyRelease, sealed=keys(crypto.SEAL_OVERHEAD + crypto.KEY_SIZE))


def job_payload_map(request: JobRequest) -> dict[str, Any]:
    padded = request.to_padded()
    return codec.decode(crypto.unpad(padded, len(padded)), len(padded))

# For each decoder: a strategy of valid messages as msgpack-ready values, and
# the function that turns such a value into the bytes the decoder reads.
VALID_VALUES: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], bytes]]] = {
    "job_envelope": (job_envelopes.map(lambda envelope: codec.decode(envelope.to_wire(), 2**20)), encode),
    "job_payload": (job_requests.map(job_payload_map), lambda value: pad_job(encode(value))),
    "reply_chunk": (reply_chunks.map(lambda chunk: codec.decode(chunk.to_wire(), 2**20)), encode),
    "chunk_body_final": (final_bodies.map(lambda body: codec.decode(crypto.unpad(body.to_padded(), CHUNK_PAD_BLOCK), 2**20)), lambda value: pad_chunk(encode(value))),
    "chunk_body_not_final": (not_final_bodies.map(lambda body: {"text": body.text}), lambda value: pad_chunk(encode(value))),
    "attestation_body": (attestation_bodies.map(lambda body: codec.decode(body.to_bytes(), 2**20)), encode),
    "attestation_document": (signed_documents.map(lambda document: codec.decode(document.to_wire(), 2**20)), encode),
    "key_release": (key_releases.map(lambda release: codec.decode(release.to_wire(), 2**20)), encode),
    "generation_params": (generation_params.map(GenerationParams.to_map), encode),
}


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Yield the path of every node in a msgpack value, the root first."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


@st.composite
def mutated_values(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """Change one node of a valid message: replace it, delete it, add a key beside it, or change "v"."""
    value = draw(valid)
    path = draw(st.sampled_from(list(paths(value))))
    action = draw(st.sampled_from(["replace", "delete", "add_key", "version"]))
    if action == "version" and isinstance(value, dict) and "v" in value:
        value["v"] = draw(st.integers(-(2**63), 2**64 - 1) | st.text(max_size=3) | st.none())
        return value
    if not path:
        return draw(msgpack_values)

    parent = value
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add_key" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(msgpack_values)
    else:
        parent[last] = draw(msgpack_values)
    return value


# -- decoders never raise anything but DecodeError --------------------------------


@pytest.mark.parametrize("name", sorted(DECODERS))
@PROPERTY_SETTINGS
@given(data=st.binary(max_size=2048))
def test_decoder_random_bytes(name, data):
    """Arbitrary bytes decode or raise DecodeError, nothing else."""
    decodes_or_raises_decode_error(DECODERS[name], data)


@pytest.mark.parametrize("name", ["job_payload", "chunk_body_final", "chunk_body_not_final"])
@PROPERTY_SETTINGS
@given(data=st.binary(max_size=1200))
def test_padded_decoder_random_plaintext(name, data):
    """Arbitrary bytes with valid padding reach the msgpack decoder and raise DecodeError only."""
    padded = pad_job(data) if name == "job_payload" else pad_chunk(data)

    decodes_or_raises_decode_error(DECODERS[name], padded)


@pytest.mark.parametrize("name", ["job_payload", "chunk_body_final", "chunk_body_not_final"])
@PROPERTY_SETTINGS
@given(data=st.data())
def test_padded_decoder_bad_padding(name, data):
    """A padded size with a broken marker or a wrong size raises DecodeError only."""
    size = data.draw(st.sampled_from(PAD_BUCKETS[:2]) if name == "job_payload" else st.integers(0, 4).map(lambda blocks: blocks * CHUNK_PAD_BLOCK))
    padded = data.draw(st.binary(min_size=size, max_size=size)) + data.draw(st.binary(max_size=3))

    decodes_or_raises_decode_error(DECODERS[name], padded)


@pytest.mark.parametrize("name", sorted(VALID_VALUES))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_decoder_wrong_structure(name, data):
    """A valid message with one field replaced, removed, added or re-versioned decodes or raises DecodeError."""
    valid, to_bytes = VALID_VALUES[name]
    value = data.draw(mutated_values(valid))

    try:
        encoded = to_bytes(value)
    except (ValueError, OverflowError):
        return  # the mutation made a value this side cannot encode or pad, so nothing reaches the decoder
    decodes_or_raises_decode_error(DECODERS[name], encoded)


@pytest.mark.parametrize("name", sorted(VALID_VALUES))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_decoder_arbitrary_msgpack(name, data):
    """Any msgpack value, map or not, decodes or raises DecodeError."""
    _, to_bytes = VALID_VALUES[name]
    value = data.draw(msgpack_values)

    decodes_or_raises_decode_error(DECODERS[name], to_bytes(value))


def encode_map_pairs(pairs: list[tuple[str, Any]]) -> bytes:
    """Encode a msgpack map from key-value pairs, repeated keys included, with a map 16 header."""
    return b"\xde" + len(pairs).to_bytes(2, "big") + b"".join(encode(key) + encode(value) for key, value in pairs)


PADDING: dict[str, Callable[[bytes], bytes]] = {"job_payload": pad_job, "chunk_body_final": pad_chunk, "chunk_body_not_final": pad_chunk}


@pytest.mark.parametrize("name", sorted(VALID_VALUES))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_decoder_duplicate_key_rejected(name, data):
    """A valid message with one key repeated under another value raises DecodeError duplicate_key."""
    valid, _ = VALID_VALUES[name]
    pairs = list(data.draw(valid).items())
    key, _ = data.draw(st.sampled_from(pairs))
    pairs.insert(data.draw(st.integers(0, len(pairs))), (key, data.draw(msgpack_values)))

    with pytest.raises(DecodeError) as raised:
        DECODERS[name](PADDING.get(name, bytes)(encode_map_pairs(pairs)))
    assert raised.value.reason == "duplicate_key"


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=1024), max_size=st.integers(0, 2048))
def test_codec_decode_any_limit(data, max_size):
    """codec.decode raises DecodeError only, for any buffer and any size limit."""
    decodes_or_raises_decode_error(lambda raw: codec.decode(raw, max_size), data)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=1024) | signed_documents.map(SignedDocument.to_wire) | hardware_documents.map(HardwareDocument.to_wire))
def test_attestation_verify_random_document(data):
    """Verifying arbitrary bytes as either kind of attestation document raises AttestationError only."""
    snp = SnpTrustPolicy(ark=make_amd_root().ark, launch_measurements=frozenset({bytes(48)}), minimum_tcb=TcbVersion(0, 0, 0, 0))
    policy = TrustPolicy({"simulated": bytes(32)}, frozenset({bytes(32)}), allow_simulated=True, sev_snp=snp)

    with pytest.raises(AttestationError):
        verify_document(data, policy, purpose="pool")


# -- round trips ----------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(envelope=job_envelopes)
def test_job_envelope_round_trip(envelope):
    """A job envelope decodes to the values it was encoded from."""
    assert JobEnvelope.from_wire(envelope.to_wire()) == envelope


@PROPERTY_SETTINGS
@given(request=job_requests)
def test_job_request_round_trip(request):
    """A job request survives padding and decoding, and its padded size is a bucket."""
    padded = request.to_padded()

    assert len(padded) in PAD_BUCKETS
    assert JobRequest.from_padded(padded) == request


@PROPERTY_SETTINGS
@given(params=generation_params)
def test_generation_params_round_trip(params):
    """Generation parameters survive their map form."""
    assert GenerationParams.from_map(codec.decode(encode(params.to_map()), 4096)) == params


@PROPERTY_SETTINGS
@given(chunk=reply_chunks)
def test_reply_chunk_round_trip(chunk):
    """A reply chunk decodes to its header and ciphertext."""
    assert ReplyChunk.from_wire(chunk.to_wire()) == chunk


@PROPERTY_SETTINGS
@given(body=not_final_bodies)
def test_chunk_body_not_final_round_trip(body):
    """A text chunk's body survives padding, and its padded size is a multiple of the block."""
    padded = body.to_padded()

    assert len(padded) % CHUNK_PAD_BLOCK == 0
    assert ChunkBody.from_padded(padded, final=False) == body


@PROPERTY_SETTINGS
@given(body=final_bodies)
def test_chunk_body_final_round_trip(body):
    """A final chunk's body, finish reason and error included, survives padding."""
    assert ChunkBody.from_padded(body.to_padded(), final=True) == body


@PROPERTY_SETTINGS
@given(body=attestation_bodies)
def test_attestation_body_round_trip(body):
    """An attestation body decodes to the same fields and its key_id matches its key."""
    decoded = AttestationBody.from_bytes(body.to_bytes())

    assert decoded == body
    assert decoded.key_id == key_id_for(body.key)


@PROPERTY_SETTINGS
@given(document=signed_documents)
def test_signed_document_round_trip(document):
    """A signed document decodes to its body and signature."""
    assert SignedDocument.from_wire(document.to_wire()) == document


@PROPERTY_SETTINGS
@given(document=hardware_documents)
def test_hardware_document_round_trip(document):
    """A hardware document decodes to its claims, report and certificates."""
    assert HardwareDocument.from_wire(document.to_wire()) == document


@PROPERTY_SETTINGS
@given(release=key_releases)
def test_key_release_round_trip(release):
    """A key release decodes to its sealed key."""
    assert KeyRelease.from_wire(release.to_wire()) == release


# -- tampering ---------------------------------------------------------------------------


def flip(data: bytes, position: int, mask: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= mask
    return bytes(changed)


@st.composite
def sealed_replies(draw: st.DrawFn) -> tuple[bytes, bytes, crypto.KeyPair, list[bytes]]:
    """Draw a job's ids, a client key pair and the wire bytes of its encrypted reply."""
    job_id = draw(keys(JOB_ID_SIZE))
    reply_token = draw(keys(REPLY_TOKEN_SIZE))
    client = crypto.KeyPair(draw(keys(crypto.KEY_SIZE)))
    attempt = draw(st.integers(1, 5))
    sender = ReplySender(job_id, reply_token, client.public, attempt, crypto.KeyPair(draw(keys(crypto.KEY_SIZE))))
    bodies = draw(st.lists(not_final_bodies, min_size=0, max_size=3)) + [draw(final_bodies)]
    wires = [sender.seal(body, final=index == len(bodies) - 1).to_wire() for index, body in enumerate(bodies)]
    return job_id, reply_token, client, wires


@PROPERTY_SETTINGS
@given(reply=sealed_replies(), data=st.data())
def test_sealed_chunk_flipped_byte_rejected(reply, data):
    """One changed byte in a chunk's header, ciphertext body or tag is rejected, and the genuine chunk still opens."""
    job_id, reply_token, client, wires = reply
    receiver = ReplyReceiver(job_id, reply_token, crypto.KeyPair(client.secret))
    target = data.draw(st.integers(0, len(wires) - 1))
    for wire in wires[:target]:
        assert receiver.open(ReplyChunk.from_wire(wire)) is not None

    wire = wires[target]
    ciphertext = ReplyChunk.from_wire(wire).ciphertext
    assert wire.endswith(ciphertext), "the test locates regions by the ciphertext being the last field"
    header_end = len(wire) - len(ciphertext)
    tag_start = len(wire) - crypto.AEAD_TAG_SIZE
    region = data.draw(st.sampled_from(["header", "body", "tag"]))
    start, end = {"header": (0, header_end), "body": (header_end, tag_start), "tag": (tag_start, len(wire))}[region]
    tampered = flip(wire, data.draw(st.integers(start, end - 1)), data.draw(st.integers(1, 255)))

    try:
        opened = receiver.open(ReplyChunk.from_wire(tampered))
    except (DecodeError, AuthenticationError, ReplyOrderError):
        opened = None
    assert opened is None, f"a chunk with a changed {region} byte was accepted"

    assert receiver.open(ReplyChunk.from_wire(wire)) is not None


@st.composite
def sealed_jobs(draw: st.DrawFn) -> tuple[crypto.KeyPair, bytes, JobRequest]:
    pool = crypto.KeyPair(draw(keys(crypto.KEY_SIZE)))
    request = draw(job_requests)
    envelope = JobEnvelope(key_id_for(pool.public), crypto.seal(request.to_padded(), pool.public))
    return pool, envelope.to_wire(), request


def open_job(pool: crypto.KeyPair, wire: bytes) -> JobRequest:
    """Open a job the way a worker does: decode, match the key id, unseal, decode the payload."""
    envelope = JobEnvelope.from_wire(wire)
    if not crypto.constant_time_equal(envelope.key_id, key_id_for(pool.public)):
        raise AuthenticationError()
    return JobRequest.from_padded(crypto.unseal(envelope.sealed, pool))


@PROPERTY_SETTINGS
@given(job=sealed_jobs(), data=st.data())
def test_sealed_job_flipped_byte_rejected(job, data):
    """One changed byte in a job's envelope header, ephemeral key, tag or ciphertext is rejected."""
    pool, wire, request = job
    sealed = JobEnvelope.from_wire(wire).sealed
    assert wire.endswith(sealed), "the test locates regions by the sealed box being the last field"
    sealed_start = len(wire) - len(sealed)
    tag_start = sealed_start + crypto.KEY_SIZE
    body_start = tag_start + crypto.AEAD_TAG_SIZE
    regions = {"header": (0, sealed_start), "ephemeral_key": (sealed_start, tag_start), "tag": (tag_start, body_start), "body": (body_start, len(wire))}
    region = data.draw(st.sampled_from(sorted(regions)))
    start, end = regions[region]
    tampered = flip(wire, data.draw(st.integers(start, end - 1)), data.draw(st.integers(1, 255)))

    assert open_job(pool, wire) == request
    with pytest.raises((DecodeError, AuthenticationError)):
        open_job(pool, tampered)
