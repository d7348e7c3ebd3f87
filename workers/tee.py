"""The TEE boundary: a backend signs reports that bind a key to a measurement.

Two backends implement it. workers/tee_tsm.py requests a report from the
CPU through Linux's configfs-tsm, with a hash of the key and the other
claims as its report data. The simulated backend here stands in for the CPU vendor's
root of trust with a software Ed25519 key and marks every document it signs
as simulated.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path

from confide.schemas import crypto
from confide.schemas.hardware import HardwareDocument
from confide.schemas.messages import AttestationBody, SignedDocument

log = logging.getLogger("confide.worker.tee")


class TeeBackend(ABC):
    platform: str
    simulated: bool

    @abstractmethod
    def attest(
        self, measurement: bytes, purpose: str, key: bytes, model: str, lifetime_s: int, dev_mode: bool = False
    ) -> SignedDocument | HardwareDocument:
        """Return a signed document that binds `key` to this worker's measurement."""

    def close(self) -> None:
        """Release what the backend holds; the simulated one holds nothing."""


class SimulatedTee(TeeBackend):
    """A software stand-in for a TEE's hardware root of trust.

    It protects nothing: the worker runs as an ordinary process and the
    platform key is a file. It exists so the whole protocol runs without
    TEE hardware, and every document it signs carries `simulated: true`.
    """

    platform = "simulated"
    simulated = True

    def __init__(self, platform_key: crypto.SigningKey) -> None:
        self._platform_key = platform_key
        log.warning(
            "TEE is SIMULATED: a software key stands in for the hardware root of trust; "
            "prompts are not protected from this machine's host"
        )

    @classmethod
    def from_file(cls, path: Path) -> SimulatedTee:
        return cls(load_platform_key(path))

    def attest(self, measurement: bytes, purpose: str, key: bytes, model: str, lifetime_s: int, dev_mode: bool = False) -> SignedDocument:
        now = int(time.time())
        body = AttestationBody(
            platform=self.platform,
            simulated=True,
            measurement=measurement,
            purpose=purpose,
            key=key,
            issued_at=now,
            expires_at=now + lifetime_s,
            model=model,
            dev_mode=dev_mode,
        ).to_bytes()
        return SignedDocument(body, self._platform_key.sign(body))


def create_platform_key(path: Path) -> crypto.SigningKey:
    """Create the simulated platform's root key file (mode 0600) unless it exists."""
    if path.exists():
        return load_platform_key(path)

    key = crypto.SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.seed)
    return key


def load_platform_key(path: Path) -> crypto.SigningKey:
    seed = path.read_bytes()
    if len(seed) != crypto.KEY_SIZE:
        raise ValueError(f"simulated platform key file {path} must hold {crypto.KEY_SIZE} bytes, found {len(seed)}")
    return crypto.SigningKey(seed)
