"""schemas/messages.cddl accepts every message in the test vectors and rejects broken ones.

The check needs pycddl and cbor2, which are not project dependencies, so the
module is skipped without them (`pip install pycddl cbor2` to run it).
pycddl validates CBOR, and msgpack's data model maps onto it one to one for
these messages: str to text string, bin to byte string, maps, arrays,
integers, floats and booleans.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files

import msgpack
import pytest

pycddl = pytest.importorskip("pycddl")
cbor2 = pytest.importorskip("cbor2")

VECTORS = json.loads(files("confide.schemas").joinpath("test-vectors.json").read_text(encoding="utf-8"))
CDDL = files("confide.schemas").joinpath("messages.cddl").read_text(encoding="utf-8")


def schema_for(rule: str):
    """Return a validator whose root is `rule`.

    pycddl 0.6 does not implement float ranges such as 0.0..2.0, which RFC
    8610 allows, so they are rewritten to the equivalent comparisons.
    """
    text = re.sub(r"(\d+\.\d+)\.\.(\d+\.\d+)", r"(float .ge \1) .and (float .le \2)", CDDL)
    return pycddl.Schema(f"root = {rule}\n{text}")


def from_hex(value: str):
    return msgpack.unpackb(bytes.fromhex(value), raw=False)


def vector_messages() -> list[tuple[str, str, object]]:
    """Return (name, CDDL rule, decoded value) for every message the vectors contain."""
    job = VECTORS["job"]
    messages = [
        ("job envelope", "job-envelope", from_hex(job["envelope"])),
        ("job request", "job-request", from_hex(job["plaintext"])),
    ]
    for vector in ("reply", "error_reply"):
        for attempt in VECTORS[vector]["attempts"]:
            messages.append((f"{vector} root input {attempt['attempt']}", "root-input", from_hex(attempt["root_input"])))
            for chunk in attempt["chunks"]:
                label = f"{vector} attempt {attempt['attempt']} chunk {chunk['index']}"
                messages.append((f"{label} wire", "reply-chunk", from_hex(chunk["wire"])))
                messages.append((f"{label} body", "chunk-body", from_hex(chunk["body_plaintext"])))
                messages.append((f"{label} associated data", "associated-data", from_hex(chunk["associated_data"])))
    attestation = VECTORS["attestation"]
    messages.append(("attestation document", "attestation-document", from_hex(attestation["document"])))
    messages.append(("attestation body", "attestation-body", from_hex(attestation["body"])))
    messages.append(("key release", "key-release", from_hex(VECTORS["key_release"]["message"])))
    messages.append(("key release refusal", "key-release-refused", from_hex(VECTORS["key_release"]["refusal"])))
    return messages


@pytest.mark.parametrize(("name", "rule", "value"), vector_messages(), ids=[name for name, _, _ in vector_messages()])
def test_vector_message_matches_cddl(name, rule, value):
    """Each message of the test vectors validates against its CDDL rule and against the root rule."""
    schema_for(rule).validate_cbor(cbor2.dumps(value))
    if rule not in {"root-input", "associated-data"}:
        schema_for("confide-message").validate_cbor(cbor2.dumps(value))


def broken_messages() -> list[tuple[str, str, object]]:
    envelope = from_hex(VECTORS["job"]["envelope"])
    request = from_hex(VECTORS["job"]["plaintext"])
    error_body = from_hex(VECTORS["error_reply"]["attempts"][0]["chunks"][0]["body_plaintext"])
    text_body = from_hex(VECTORS["reply"]["attempts"][0]["chunks"][0]["body_plaintext"])
    return [
        ("sealed not a bucket", "job-envelope", {**envelope, "sealed": envelope["sealed"][:-1]}),
        ("unknown envelope field", "job-envelope", {**envelope, "extra": 1}),
        ("version 2", "job-envelope", {**envelope, "v": 2}),
        ("temperature above 2", "job-request", {**request, "params": {**request["params"], "temperature": 2.5}}),
        ("no messages", "job-request", {**request, "messages": []}),
        ("role not in the set", "job-request", {**request, "messages": [{"role": "tool", "content": "x"}]}),
        ("error reply without code", "chunk-body", {key: value for key, value in error_body.items() if key != "error"}),
        ("text chunk with error code", "chunk-body", {**text_body, "error": "expired"}),
    ]


@pytest.mark.parametrize(("name", "rule", "value"), broken_messages(), ids=[name for name, _, _ in broken_messages()])
def test_broken_message_fails_cddl(name, rule, value):
    """A message that the reference decoder rejects also fails its CDDL rule."""
    with pytest.raises(pycddl.ValidationError):
        schema_for(rule).validate_cbor(cbor2.dumps(value))
