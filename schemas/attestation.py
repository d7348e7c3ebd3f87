"""Verification of attestation documents, shared by clients and pool members.

A document passes only if every check can be made and succeeds. The checks:
the policy pins a key for the document's platform, the signature verifies,
the measurement is in the allowed set, the document is fresh and its purpose
is the expected one. A missing expected value is a failure, never a pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confide.errors import AttestationError, AuthenticationError, DecodeError
from confide.schemas import crypto
from confide.schemas.messages import AttestationBody, SignedDocument



@dataclass(frozen=True)
class TrustPolicy:
    """Pinned platform keys and allowed measurements that a verifier accepts."""

    platform_keys: dict[str, bytes]
    measurements: frozenset[bytes]
    allow_simulated: bool = False
    max_age_s: int = 3600
    clock_skew_s: int = 120
    name: str = field(default="", compare=False)


def verify_document(
    unverified_wire: bytes,
    policy: TrustPolicy,
    purpose: str,
    now: float | None = None,
) -> AttestationBody:
    now = time.time() if now is None else now

    try:
        document = SignedDocument.from_wire(unverified_wire)
        unverified_body = AttestationBody.from_bytes(document.body)
    except DecodeError as exc:
        raise AttestationError(f"the attestation document is malformed ({exc.reason})") from None

    platform = unverified_body.platform
    verify_key = policy.platform_keys.get(platform)
    if verify_key is None:
        raise AttestationError(f"no pinned root key for platform '{platform}': the trust policy does not accept it")
    try:
        crypto.verify_signature(verify_key, document.body, document.signature)
    except AuthenticationError:
        raise AttestationError("the attestation signature is invalid for the pinned platform key") from None
    body = unverified_body

    if body.simulated != (platform == "simulated"):
        raise AttestationError("the document's simulated flag contradicts its platform")
    if body.simulated and not policy.allow_simulated:
        raise AttestationError("the pool runs on a simulated TEE and the trust policy does not allow simulated platforms")
    if not policy.measurements:
        raise AttestationError("the trust policy lists no allowed measurements, so nothing can be compared")
    if not any(crypto.constant_time_equal(body.measurement, allowed) for allowed in policy.measurements):
        raise AttestationError(f"measurement {body.measurement.hex()[:16]}... is not in the allowed set")
    if body.issued_at > now + policy.clock_skew_s:
        raise AttestationError("the attestation document is dated in the future")
    if now - body.issued_at > policy.max_age_s + policy.clock_skew_s:
        raise AttestationError(f"the attestation document is stale: issued {int(now - body.issued_at)} s ago")
    if body.expires_at < now - policy.clock_skew_s:
        raise AttestationError("the attestation document has expired")
    if body.purpose != purpose:
        raise AttestationError(f"the document binds a '{body.purpose}' key, expected '{purpose}'")
    return body
