"""The attestation chain of trust: platform signature, release log proof, freshness, dev mode.

Documents are built with the real simulated TEE backend and a real release
log (SQLite, RFC 6962 proofs); the log-consistency tests publish logs to a
real nats-server.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import nats
import pytest

from confide.clients.log_monitor import LogMonitor
from confide.errors import AttestationError
from confide.schemas import crypto
from confide.schemas.attestation import TrustPolicy, verify_document, verify_with_steps
from confide.schemas.messages import AttestationBody, SignedDocument
from confide.schemas.release_feed import evidence_for, publish_log
from confide.schemas.release_log import ReleaseLog
from confide.schemas.transparency import ReleaseRecord
from confide.workers.tee import SimulatedTee

MEASUREMENT = bytes.fromhex("11" * 32)
OTHER_MEASUREMENT = bytes.fromhex("22" * 32)


class Fixture:
    def __init__(self, directory: Path) -> None:
        self.platform = crypto.SigningKey.generate()
        self.tee = SimulatedTee(self.platform)
        self.log_key = crypto.SigningKey.generate()
        directory.mkdir(parents=True, exist_ok=True)
        self.log = ReleaseLog(directory / "log.sqlite3")
        self.pool_key = crypto.KeyPair.generate()

    def release(self, measurement: bytes, version: str) -> int:
        return self.log.append(ReleaseRecord(measurement, version, int(time.time())))

    def leaves(self) -> list[bytes]:
        return [self.log.leaf(i) for i in range(self.log.size)]

    def document(self, measurement: bytes = MEASUREMENT, leaf_index: int | None = 0, dev_mode: bool = False, lifetime_s: int = 600) -> bytes:
        signed = self.tee.attest(measurement, "pool", self.pool_key.public, "model.gguf", lifetime_s, dev_mode=dev_mode)
        if leaf_index is not None:
            head = self.log.sign_tree_head(self.log_key)
            signed = replace(signed, release=evidence_for(leaf_index, self.leaves(), head))
        return signed.to_wire()

    def policy(self, **changes) -> TrustPolicy:
        base = TrustPolicy({"simulated": self.platform.verify_key}, allow_simulated=True, log_key=self.log_key.verify_key)
        return replace(base, **changes)


@pytest.fixture
def chain(tmp_path) -> Fixture:
    fixture = Fixture(tmp_path)
    fixture.release(OTHER_MEASUREMENT, "0.0.9")
    fixture.release(MEASUREMENT, "0.1.0")
    return fixture


def test_logged_release_verifies_with_every_step(chain):
    """A document proven against the signed log passes and reports each step in order."""
    steps = []
    verified = verify_with_steps(chain.document(leaf_index=1), chain.policy(), "pool", report=lambda step, detail: steps.append(step))

    assert verified.body.key == chain.pool_key.public
    assert verified.leaf_index == 1
    assert steps == ["document", "signature", "platform", "release log", "measurement", "freshness", "key"]


def test_unknown_measurement_rejected(chain):
    """A measurement with no proof and no listed value is rejected."""
    with pytest.raises(AttestationError, match="no release log proof"):
        verify_document(chain.document(leaf_index=None), chain.policy(), "pool")
    with pytest.raises(AttestationError, match="not in the allowed set"):
        verify_document(chain.document(leaf_index=None), chain.policy(log_key=None, measurements=frozenset({OTHER_MEASUREMENT})), "pool")


def test_inclusion_proof_for_another_leaf_rejected(chain):
    """A valid proof of some other release does not vouch for this worker's measurement."""
    with pytest.raises(AttestationError, match="proof is for measurement"):
        verify_document(chain.document(leaf_index=0), chain.policy(), "pool")


def test_tree_head_signed_by_other_log_rejected(chain):
    with pytest.raises(AttestationError, match="release log evidence is invalid"):
        verify_document(chain.document(leaf_index=1), chain.policy(log_key=crypto.SigningKey.generate().verify_key), "pool")


def test_bad_platform_signature_rejected(chain):
    """One flipped bit in the signature fails, and so does a body signed by another platform."""
    document = SignedDocument.from_wire(chain.document(leaf_index=1))
    flipped = bytearray(document.signature)
    flipped[0] ^= 1

    with pytest.raises(AttestationError, match="signature is invalid"):
        verify_document(replace(document, signature=bytes(flipped)).to_wire(), chain.policy(), "pool")
    with pytest.raises(AttestationError, match="signature is invalid"):
        verify_document(document.to_wire(), chain.policy(platform_keys={"simulated": crypto.SigningKey.generate().verify_key}), "pool")


def test_key_not_bound_by_signature_rejected(chain):
    """Swapping the pool key in the body breaks the signature that binds it."""
    document = SignedDocument.from_wire(chain.document(leaf_index=1))
    body = AttestationBody.from_bytes(document.body)
    swapped = replace(body, key=crypto.KeyPair.generate().public).to_bytes()

    with pytest.raises(AttestationError, match="signature is invalid"):
        verify_document(replace(document, body=swapped).to_wire(), chain.policy(), "pool")


def test_stale_document_rejected(chain):
    document = chain.document(leaf_index=1)
    later = time.time() + chain.policy().max_age_s + 3600

    with pytest.raises(AttestationError, match="stale"):
        verify_document(document, chain.policy(), "pool", now=later)


def test_dev_mode_needs_explicit_permission(chain):
    """A development-mode pool is rejected unless the policy allows it, and then needs a listed measurement."""
    document = chain.document(measurement=bytes(32), leaf_index=None, dev_mode=True)

    with pytest.raises(AttestationError, match="development mode"):
        verify_document(document, chain.policy(), "pool")
    with pytest.raises(AttestationError, match="lists no allowed measurements"):
        verify_document(document, chain.policy(allow_dev=True), "pool")
    body = verify_document(document, chain.policy(allow_dev=True, measurements=frozenset({bytes(32)})), "pool")
    assert body.dev_mode


def test_simulated_rejected_unless_allowed(chain):
    with pytest.raises(AttestationError, match="simulated"):
        verify_document(chain.document(leaf_index=1), chain.policy(allow_simulated=False), "pool")


@pytest.mark.anyio
async def test_log_monitor_detects_inconsistent_tree_heads(broker, tmp_path):
    """A log that rewrites history after a device stored its head is detected; an extension is accepted."""
    chain = Fixture(tmp_path)
    chain.release(OTHER_MEASUREMENT, "0.0.9")
    chain.release(MEASUREMENT, "0.1.0")
    monitor = LogMonitor(tmp_path / "head.json")
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    try:
        first = chain.log.sign_tree_head(chain.log_key)
        await publish_log(js, chain.leaves(), first)
        assert "first tree head" in await monitor.check(js, first.head, chain.log_key.verify_key)

        chain.release(bytes.fromhex("33" * 32), "0.2.0")
        extended = chain.log.sign_tree_head(chain.log_key)
        await publish_log(js, chain.leaves(), extended)
        assert "consistent" in await monitor.check(js, extended.head, chain.log_key.verify_key)

        forked = Fixture(tmp_path / "fork")
        forked.log_key = chain.log_key
        for measurement in (MEASUREMENT, OTHER_MEASUREMENT, bytes(32), bytes.fromhex("44" * 32)):
            forked.release(measurement, "fork")
        fork_head = forked.log.sign_tree_head(chain.log_key)
        await publish_log(js, forked.leaves(), fork_head)
        with pytest.raises(AttestationError, match="not consistent"):
            await monitor.check(js, fork_head.head, chain.log_key.verify_key)

        same_size_fork = Fixture(tmp_path / "fork2")
        for measurement in (MEASUREMENT, MEASUREMENT, MEASUREMENT):
            same_size_fork.release(measurement, "other")
        with pytest.raises(AttestationError, match="two different trees"):
            await monitor.check(js, same_size_fork.log.sign_tree_head(chain.log_key).head, chain.log_key.verify_key)
    finally:
        await nc.close()
