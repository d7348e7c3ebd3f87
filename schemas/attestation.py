"""Verification of attestation documents, shared by clients and pool members.

Two kinds of document reach a verifier. A simulated worker's "attestation"
is a body signed by the simulated platform's Ed25519 key. An SEV-SNP
worker's "hardware_attestation" (schemas/hardware.py) is a raw report
signed by the processor, plus the claims its report data binds. Both pass
the same checks; only the first two differ:

1. the policy pins a root for the document's platform: an Ed25519 key for
   "simulated", AMD's ARK and the allowed launch measurements for "sev-snp";
2. the platform's signature verifies: over the body, or over the report,
   whose certificate chain leads to the pinned ARK and whose report data
   is the hash of the document's claims (schemas/sev_snp.py);
3. a simulated or development-mode worker is accepted only if the policy allows it;
4. the measurement is allowed: it is in the release transparency log (an
   inclusion proof to a tree head signed by the pinned log key) or, for a
   policy without a log key, in the policy's list of measurements;
5. the document is fresh and binds a key for the expected purpose.

A missing expected value (no pinned key, no log evidence, an empty list) is a
failure, never a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confide.errors import AttestationError, AuthenticationError, DecodeError, TransparencyError
from confide.schemas import crypto
from confide.schemas.codec import decode
from confide.schemas.hardware import MAX_HARDWARE_DOCUMENT, HardwareDocument
from confide.schemas.messages import AttestationBody, ReleaseEvidence, SignedDocument
from confide.schemas.sev_snp import SnpTrustPolicy, verify_report
from confide.schemas.transparency import InclusionProof, ReleaseRecord, TreeHead, verify_tree_head

StepReporter = Callable[[str, str], None]


@dataclass(frozen=True)
class TrustPolicy:
    """Pinned platform roots, the pinned release log key and the measurements a verifier accepts.

    `platform_keys` pins Ed25519 keys by platform name ("simulated");
    `sev_snp`, when set, pins AMD's root and the SEV-SNP launch values.
    """

    platform_keys: dict[str, bytes]
    measurements: frozenset[bytes] = frozenset()
    allow_simulated: bool = False
    max_age_s: int = 3600
    clock_skew_s: int = 120
    name: str = field(default="", compare=False)
    log_key: bytes | None = None
    allow_dev: bool = False
    sev_snp: SnpTrustPolicy | None = None


@dataclass(frozen=True)
class VerifiedDocument:
    body: AttestationBody
    tree_head: TreeHead | None  # the log head the measurement was proven against, if any
    leaf_index: int | None


def verify_document(unverified_wire: bytes, policy: TrustPolicy, purpose: str, now: float | None = None) -> AttestationBody:
    return verify_with_steps(unverified_wire, policy, purpose, now).body


def verify_with_steps(
    unverified_wire: bytes,
    policy: TrustPolicy,
    purpose: str,
    now: float | None = None,
    report: StepReporter = lambda step, detail: None,
) -> VerifiedDocument:
    """Verify a document, calling `report(step, detail)` after each check that passes."""
    now = time.time() if now is None else now

    if _document_type(unverified_wire) == "hardware_attestation":
        body, release, platform_note = _verify_hardware(unverified_wire, policy, now, report)
    else:
        body, release = _verify_signed(unverified_wire, policy, report)
        platform_note = "SIMULATED TEE" if body.simulated else "hardware TEE"

    if body.simulated != (body.platform == "simulated"):
        raise AttestationError("the document's simulated flag contradicts its platform")
    if body.simulated and not policy.allow_simulated:
        raise AttestationError("the pool runs on a simulated TEE and the trust policy does not allow simulated platforms")
    if body.dev_mode and not policy.allow_dev:
        raise AttestationError("the pool runs in development mode (its code need not be a logged release); pass --allow-dev to accept it")
    if body.dev_mode:
        platform_note += ", DEVELOPMENT MODE"
    report("platform", platform_note)

    tree_head, leaf_index = _check_measurement(release, body, policy, report)

    if body.issued_at > now + policy.clock_skew_s:
        raise AttestationError("the attestation document is dated in the future")
    if now - body.issued_at > policy.max_age_s + policy.clock_skew_s:
        raise AttestationError(f"the attestation document is stale: issued {int(now - body.issued_at)} s ago")
    if body.expires_at < now - policy.clock_skew_s:
        raise AttestationError("the attestation document has expired")
    report("freshness", f"issued {max(0, int(now - body.issued_at))} s ago, expires in {int(body.expires_at - now)} s")

    if body.purpose != purpose:
        raise AttestationError(f"the document binds a '{body.purpose}' key, expected '{purpose}'")
    report("key", f"{purpose} key {body.key_id.hex()} bound by the platform's signature")
    return VerifiedDocument(body, tree_head, leaf_index)


def _document_type(unverified_wire: bytes) -> str | None:
    """Read a document's "type" to pick its verifier; the verifier decodes it again, strictly."""
    try:
        value = decode(unverified_wire, MAX_HARDWARE_DOCUMENT)
    except DecodeError:
        return None  # SignedDocument.from_wire reports the specific error
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


def _verify_signed(
    unverified_wire: bytes, policy: TrustPolicy, report: StepReporter
) -> tuple[AttestationBody, ReleaseEvidence | None]:
    """Check a simulated platform's Ed25519 signature over the body and return the body."""
    try:
        document = SignedDocument.from_wire(unverified_wire)
        unverified_body = AttestationBody.from_bytes(document.body)
    except DecodeError as exc:
        raise AttestationError(f"the attestation document is malformed ({exc.reason})") from None
    report("document", f"platform {unverified_body.platform}, purpose {unverified_body.purpose}")

    platform = unverified_body.platform
    verify_key = policy.platform_keys.get(platform)
    if verify_key is None:
        raise AttestationError(f"no pinned root key for platform '{platform}': the trust policy does not accept it")
    try:
        crypto.verify_signature(verify_key, document.body, document.signature)
    except AuthenticationError:
        raise AttestationError("the attestation signature is invalid for the pinned platform key") from None
    report("signature", f"signed by the pinned {platform} root key {crypto.fingerprint(verify_key)}")
    return unverified_body, document.release


def _verify_hardware(
    unverified_wire: bytes, policy: TrustPolicy, now: float, report: StepReporter
) -> tuple[AttestationBody, ReleaseEvidence | None, str]:
    """Check a hardware report's chain, signature and key binding, and return the claims it binds."""
    try:
        unverified = HardwareDocument.from_wire(unverified_wire)
    except DecodeError as exc:
        raise AttestationError(f"the hardware attestation document is malformed ({exc.reason})") from None
    report("document", f"platform {unverified.platform}, purpose {unverified.purpose}")

    if unverified.platform != "sev-snp":
        # NOTE: TDX quotes (DCAP) are not parsed or verified by this version,
        # so a TDX pool is refused rather than accepted unchecked.
        raise AttestationError(f"confide cannot verify '{unverified.platform}' reports yet, only SEV-SNP reports")
    if policy.sev_snp is None:
        raise AttestationError("the trust policy pins no AMD root (ARK), so an SEV-SNP document cannot be verified")
    snp_report = verify_report(unverified.report, unverified.certificates, policy.sev_snp, unverified.report_data(), now)
    document = unverified
    report("signature", f"SEV-SNP report signed by a VCEK that chains to the pinned ARK {crypto.fingerprint(policy.sev_snp.ark)}, over the document's claims")
    note = f"hardware TEE: SEV-SNP, launch measurement {snp_report.measurement.hex()[:16]}..., TCB ({snp_report.reported_tcb})"
    return document.claims(), document.release, note


def _check_measurement(
    release: ReleaseEvidence | None, body: AttestationBody, policy: TrustPolicy, report: StepReporter
) -> tuple[TreeHead | None, int | None]:
    measurement = body.measurement.hex()
    if policy.log_key is not None and release is not None:
        try:
            head = verify_tree_head(release.tree_head, policy.log_key)
            record = ReleaseRecord.from_leaf(release.leaf)
            proof = InclusionProof.from_wire(release.proof)
            proof.verify(release.leaf, head)
        except (TransparencyError, DecodeError) as exc:
            raise AttestationError(f"the release log evidence is invalid: {exc}") from None
        if not crypto.constant_time_equal(record.measurement, body.measurement):
            raise AttestationError(f"the release log proof is for measurement {record.measurement.hex()[:16]}..., not the worker's {measurement[:16]}...")
        report("release log", f"tree head of size {head.tree_size} signed by the pinned log key")
        report("measurement", f"{measurement[:16]}... is release '{record.version}', leaf {proof.leaf_index} of the log")
        return head, proof.leaf_index

    if body.dev_mode or policy.log_key is None:
        if not policy.measurements:
            raise AttestationError("the trust policy lists no allowed measurements and the document has no release log proof, so nothing can be compared")
        if not any(crypto.constant_time_equal(body.measurement, allowed) for allowed in policy.measurements):
            raise AttestationError(f"measurement {measurement[:16]}... is not in the allowed set")
        report("measurement", f"{measurement[:16]}... is in the trust policy's allowed set")
        return None, None

    raise AttestationError(f"measurement {measurement[:16]}... comes with no release log proof, and the trust policy requires one")
