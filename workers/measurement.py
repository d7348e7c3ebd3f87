"""The worker's measurement: what a client checks before it trusts a pool.

measurement = BLAKE2b-256(personal="confide:measure1",
                          msgpack(["confide-measurement", 1, code, model, settings]))

where `code` hashes every Python file of the packages that run inside the
enclave (path and contents, in sorted order), `model` hashes the GGUF file
and `settings` are the generation settings that change what the model does.
A real TEE measures the launched image instead; this digest is what the
simulated backend reports and what `confide up` pins for its clients.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import hashlib

from confide.schemas import crypto
from confide.schemas.codec import encode

MEASUREMENT_PERSON = b"confide:measure1"
CODE_PERSON = b"confide:code:v1\x00"
MODEL_PERSON = b"confide:model:v1"
ENCLAVE_PACKAGES = ("confide", "confide.workers", "confide.schemas", "confide.broker_config")


def code_digest() -> bytes:
    entries = []
    for package in ENCLAVE_PACKAGES:
        spec = find_spec(package)
        assert spec is not None and spec.submodule_search_locations, package
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.glob("*.py")):
            entries.append([f"{package}/{path.name}", path.read_bytes()])
    return crypto.digest(encode(entries), CODE_PERSON)


def file_digest(path: Path) -> bytes:
    """BLAKE2b-256 of a file, streamed: hashlib's BLAKE2b is the same function as libsodium's."""
    state = hashlib.blake2b(digest_size=32, person=MODEL_PERSON)
    with path.open("rb") as handle:
        while block := handle.read(1024 * 1024):
            state.update(block)
    return state.digest()


def measure(model_path: Path, settings: dict[str, object]) -> bytes:
    return crypto.digest(encode(["confide-measurement", 1, code_digest(), file_digest(model_path), settings]), MEASUREMENT_PERSON)
