"""Verification of AMD SEV-SNP attestation reports; schemas/attestation.py applies it to hardware documents.

NOTE: no SEV-SNP hardware and no AMD certificate was available when this
module was written. It has run only against a root, a certificate chain
and reports that the tests build themselves with the same algorithms, never
against a report from a real AMD processor or AMD's real ARK, ASK and VCEK.

The report is the 0x4A0-byte ATTESTATION_REPORT of AMD's SEV-SNP firmware
ABI specification, little-endian, at the offsets used below. The virtee
`sev` crate and Google's go-sev-guest read the same layout. The VCEK signs
bytes 0x000 to 0x29F with ECDSA P-384 and SHA-384. The signature at 0x2A0
stores r and then s, each little-endian and zero-padded to 72 bytes.

The VCEK's certificate chains to AMD's root: ARK (self-signed) signs the
ASK, the ASK signs the VCEK, and both signatures are RSASSA-PSS with
SHA-384. The VCEK certificate carries the chip id (hwID) and the TCB
version it was derived for as X.509 extensions under 1.3.6.1.4.1.3704.1,
the OIDs that go-sev-guest's kds package reads.

verify_report() passes only if every check can be made and succeeds. In
this order:

- the report has the right size, a supported version and algorithm;
- the chain verifies up to the ARK the caller pins;
- the VCEK's hwID and TCB extensions equal the report's chip id and
  reported TCB, and the report's signature verifies under the VCEK;
- the report's signer info names the VCEK;
- the guest policy forbids debugging and a migration agent, unless allowed;
- the VMPL is the expected one and the reported TCB meets the minimum;
- the launch measurement is in the allowed set;
- the report data equals the expected key binding.

A missing expected value is a failure, never a pass.
"""

from __future__ import annotations

import datetime
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from confide.errors import AttestationError
from confide.schemas import crypto
from confide.schemas.hardware import REPORT_DATA_SIZE

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
MEASUREMENT_SIZE = 48
CHIP_ID_SIZE = 64
ECDSA_COMPONENT_SIZE = 72
P384_SCALAR_SIZE = 48

SUPPORTED_VERSIONS = frozenset({2, 3})
SIGNATURE_ALGORITHM_ECDSA_P384_SHA384 = 1

# Guest policy bits (report offset 0x08).
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19

# Signer info (report offset 0x48): bits 4:2 name the key that signed the report.
SIGNING_KEY_SHIFT = 2
SIGNING_KEY_MASK = 0b111
SIGNING_KEY_VCEK = 0
SIGNING_KEY_NAMES = {0: "VCEK", 1: "VLEK", 7: "none"}

# VCEK certificate extensions: security patch levels and the chip id.
OID_BOOT_LOADER_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
OID_TEE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
OID_SNP_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
OID_MICROCODE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
OID_HARDWARE_ID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")

# AMD's ARK and ASK are 4096-bit RSA keys. The minimum is lower so that
# the tests' 2048-bit keys, still a safe size, pass.
MIN_RSA_KEY_SIZE = 2048


@dataclass(frozen=True)
class TcbVersion:
    """The security patch levels of one SEV-SNP TCB, as a report or a VCEK states them.

    NOTE: this is the Milan and Genoa layout (boot loader, TEE, 4 reserved
    bytes, SNP firmware, microcode). Turin processors order the bytes
    differently, and their reports are not supported here.
    """

    boot_loader: int
    tee: int
    snp: int
    microcode: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> TcbVersion:
        if len(raw) != 8:
            raise ValueError(f"a TCB version is 8 bytes, got {len(raw)}")
        return cls(boot_loader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def to_bytes(self) -> bytes:
        return bytes([self.boot_loader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])

    def __str__(self) -> str:
        return f"boot loader {self.boot_loader}, TEE {self.tee}, SNP {self.snp}, microcode {self.microcode}"

    def meets(self, minimum: TcbVersion) -> bool:
        """Return whether every component is at least the minimum's."""
        return (
            self.boot_loader >= minimum.boot_loader
            and self.tee >= minimum.tee
            and self.snp >= minimum.snp
            and self.microcode >= minimum.microcode
        )


@dataclass(frozen=True, repr=False)
class SnpReport:
    """The fields of one SEV-SNP attestation report, unverified until verify_report returns it."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algorithm: int
    platform_version: TcbVersion
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    chip_id: bytes
    signature_r: int
    signature_s: int
    signed_bytes: bytes

    @property
    def signing_key(self) -> int:
        return (self.signer_info >> SIGNING_KEY_SHIFT) & SIGNING_KEY_MASK

    def __repr__(self) -> str:
        return f"SnpReport(version={self.version}, vmpl={self.vmpl}, measurement={self.measurement.hex()[:16]}...)"


@dataclass(frozen=True)
class SnpTrustPolicy:
    """The pinned AMD root and the report values a verifier accepts from SEV-SNP workers.

    `ark` is the DER certificate of the AMD root key the verifier pins.
    `launch_measurements` are the allowed 48-byte SNP launch digests of the
    guest image. `minimum_tcb` is the lowest TCB accepted: pass
    TcbVersion(0, 0, 0, 0) to accept any TCB AMD issued a VCEK for. The
    confide measurement a document claims, its freshness and its purpose are
    checked by schemas/attestation.py, as for every platform.
    """

    ark: bytes = field(repr=False)
    launch_measurements: frozenset[bytes]
    minimum_tcb: TcbVersion
    vmpl: int = 0
    allow_debug: bool = False
    allow_migration_agent: bool = False


# -- parsing ---------------------------------------------------------------------------


def parse_report(unverified_report: bytes) -> SnpReport:
    """Parse the fixed layout of a report. Nothing in the result is verified yet.

    Raises AttestationError when the report has the wrong size, an
    unsupported version or signature algorithm, or non-zero signature padding.
    """
    if not isinstance(unverified_report, (bytes, bytearray)):
        raise AttestationError(f"the SEV-SNP report must be bytes, got {type(unverified_report).__name__}")
    if len(unverified_report) != REPORT_SIZE:
        raise AttestationError(
            f"the SEV-SNP report is {len(unverified_report)} bytes, expected {REPORT_SIZE} (0x{REPORT_SIZE:X}): "
            "it is truncated or is not an SEV-SNP report"
        )
    data = bytes(unverified_report)

    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise AttestationError(f"SEV-SNP report version {version} is not supported (supported: {sorted(SUPPORTED_VERSIONS)})")
    vmpl, signature_algorithm = struct.unpack_from("<II", data, 0x30)
    if signature_algorithm != SIGNATURE_ALGORITHM_ECDSA_P384_SHA384:
        raise AttestationError(f"SEV-SNP report signature algorithm {signature_algorithm} is not ECDSA P-384 with SHA-384 (1)")
    (platform_info,) = struct.unpack_from("<Q", data, 0x40)
    (signer_info,) = struct.unpack_from("<I", data, 0x48)

    signature = data[SIGNED_SIZE:]
    r_bytes = signature[:ECDSA_COMPONENT_SIZE]
    s_bytes = signature[ECDSA_COMPONENT_SIZE : 2 * ECDSA_COMPONENT_SIZE]
    if any(r_bytes[P384_SCALAR_SIZE:]) or any(s_bytes[P384_SCALAR_SIZE:]):
        raise AttestationError("the SEV-SNP report signature has non-zero bytes in the padding of r or s")
    if any(signature[2 * ECDSA_COMPONENT_SIZE :]):
        raise AttestationError("the SEV-SNP report has non-zero bytes after its signature")

    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=vmpl,
        signature_algorithm=signature_algorithm,
        platform_version=TcbVersion.from_bytes(data[0x38:0x40]),
        platform_info=platform_info,
        signer_info=signer_info,
        report_data=data[0x50:0x90],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=TcbVersion.from_bytes(data[0x180:0x188]),
        chip_id=data[0x1A0:0x1E0],
        signature_r=int.from_bytes(r_bytes, "little"),
        signature_s=int.from_bytes(s_bytes, "little"),
        signed_bytes=data[:SIGNED_SIZE],
    )


# -- the certificate chain --------------------------------------------------------------


def verify_certificate_chain(chain: Sequence[bytes], pinned_ark: bytes, now: datetime.datetime) -> x509.Certificate:
    """Verify VCEK <- ASK <- pinned ARK and return the VCEK certificate.

    `chain` is [VCEK, ASK] or [VCEK, ASK, ARK] as DER. A third certificate
    must be byte-identical to the pinned ARK, which is the only trust anchor.
    """
    if not pinned_ark:
        raise AttestationError("no AMD root key (ARK) is pinned, so no VCEK can be verified")
    if len(chain) < 2:
        raise AttestationError(
            f"the document carries {len(chain)} certificate(s), but the VCEK and the ASK are both required "
            "(fetching them from AMD's key distribution service is not built)"
        )
    if len(chain) > 3:
        raise AttestationError(f"the document carries {len(chain)} certificates, at most 3 (VCEK, ASK, ARK) are expected")
    if len(chain) == 3 and not crypto.constant_time_equal(bytes(chain[2]), pinned_ark):
        raise AttestationError("the document's ARK certificate differs from the pinned ARK")

    ark = _load_certificate(pinned_ark, "pinned ARK")
    ask = _load_certificate(chain[1], "ASK")
    vcek = _load_certificate(chain[0], "VCEK")
    for name, certificate in (("ARK", ark), ("ASK", ask), ("VCEK", vcek)):
        _check_validity(certificate, name, now)
    _check_issued_by(ask, ark, "ASK", "ARK")
    _check_issued_by(vcek, ask, "VCEK", "ASK")

    public_key = vcek.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp384r1":
        raise AttestationError("the VCEK certificate's key is not an ECDSA P-384 key")
    return vcek


def _load_certificate(der: bytes, name: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(bytes(der))
    except ValueError:
        raise AttestationError(f"the {name} certificate is not a valid DER X.509 certificate") from None


def _check_validity(certificate: x509.Certificate, name: str, now: datetime.datetime) -> None:
    if now < certificate.not_valid_before_utc:
        raise AttestationError(f"the {name} certificate is not valid before {certificate.not_valid_before_utc.isoformat()}")
    if now > certificate.not_valid_after_utc:
        raise AttestationError(f"the {name} certificate expired at {certificate.not_valid_after_utc.isoformat()}")


def _check_issued_by(certificate: x509.Certificate, issuer: x509.Certificate, name: str, issuer_name: str) -> None:
    """Check one RSASSA-PSS SHA-384 signature of the chain, the only algorithm AMD's chain uses."""
    if certificate.issuer != issuer.subject:
        raise AttestationError(f"the {name} certificate's issuer is not the {issuer_name}'s subject")
    if certificate.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        raise AttestationError(f"the {name} certificate is not signed with RSASSA-PSS, the algorithm of AMD's chain")
    if not isinstance(certificate.signature_hash_algorithm, hashes.SHA384):
        raise AttestationError(f"the {name} certificate's signature does not use SHA-384")
    issuer_key = issuer.public_key()
    if not isinstance(issuer_key, rsa.RSAPublicKey) or issuer_key.key_size < MIN_RSA_KEY_SIZE:
        raise AttestationError(f"the {issuer_name} certificate's key is not an RSA key of at least {MIN_RSA_KEY_SIZE} bits")

    pss = certificate.signature_algorithm_parameters
    if not isinstance(pss, padding.PSS):
        raise AttestationError(f"the {name} certificate's RSASSA-PSS parameters are invalid")
    try:
        issuer_key.verify(certificate.signature, certificate.tbs_certificate_bytes, pss, certificate.signature_hash_algorithm)
    except InvalidSignature:
        raise AttestationError(f"the {name} certificate's signature does not verify under the {issuer_name}'s key") from None


def _check_vcek_matches_report(vcek: x509.Certificate, report: SnpReport) -> None:
    """Check that the VCEK was issued for this chip and for the TCB the report states."""
    hardware_id = _extension_value(vcek, OID_HARDWARE_ID, "hwID")
    if hardware_id[:2] == b"\x04\x40" and len(hardware_id) == CHIP_ID_SIZE + 2:
        # A DER OCTET STRING, though AMD's certificates store the 64 bytes raw.
        hardware_id = hardware_id[2:]
    if len(hardware_id) != CHIP_ID_SIZE:
        raise AttestationError(f"the VCEK's hwID extension is {len(hardware_id)} bytes, expected {CHIP_ID_SIZE}")
    if not any(report.chip_id):
        raise AttestationError("the report's chip id is masked (all zero), so it cannot be matched to the VCEK")
    if not crypto.constant_time_equal(hardware_id, report.chip_id):
        raise AttestationError("the report's chip id differs from the VCEK's hwID: the VCEK belongs to another processor")

    certified = TcbVersion(
        boot_loader=_extension_integer(vcek, OID_BOOT_LOADER_SPL, "blSPL"),
        tee=_extension_integer(vcek, OID_TEE_SPL, "teeSPL"),
        snp=_extension_integer(vcek, OID_SNP_SPL, "snpSPL"),
        microcode=_extension_integer(vcek, OID_MICROCODE_SPL, "ucodeSPL"),
    )
    if certified != report.reported_tcb:
        raise AttestationError(f"the report's reported TCB {report.reported_tcb} differs from the VCEK's TCB {certified}")


def _extension_value(certificate: x509.Certificate, oid: x509.ObjectIdentifier, name: str) -> bytes:
    try:
        extension = certificate.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        raise AttestationError(f"the VCEK certificate lacks the {name} extension ({oid.dotted_string})") from None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise AttestationError(f"the VCEK certificate's {name} extension has an unexpected type")
    return value.value


def _extension_integer(certificate: x509.Certificate, oid: x509.ObjectIdentifier, name: str) -> int:
    """Read an SPL extension: a DER INTEGER from 0 to 255."""
    der = _extension_value(certificate, oid, name)
    if len(der) < 3 or der[0] != 0x02 or der[1] != len(der) - 2 or der[1] > 2:
        raise AttestationError(f"the VCEK certificate's {name} extension is not a small DER INTEGER")
    value = int.from_bytes(der[2:], "big", signed=True)
    if not 0 <= value <= 255:
        raise AttestationError(f"the VCEK certificate's {name} extension is {value}, outside 0 to 255")
    return value


# -- the report ------------------------------------------------------------------------------


def verify_report(
    unverified_report: bytes,
    certificate_chain: Sequence[bytes],
    policy: SnpTrustPolicy,
    expected_report_data: bytes,
    now: float | None = None,
) -> SnpReport:
    """Verify a raw SEV-SNP report against the pinned ARK, the policy and the expected report data.

    Return the parsed report, or raise AttestationError naming the first
    check that failed.
    """
    now = time.time() if now is None else now
    if len(expected_report_data) != REPORT_DATA_SIZE:
        raise AttestationError(f"the expected report data is {len(expected_report_data)} bytes, {REPORT_DATA_SIZE} are required to compare")
    if not policy.launch_measurements:
        raise AttestationError("the trust policy lists no allowed SEV-SNP launch measurements, so nothing can be compared")

    unverified = parse_report(unverified_report)
    vcek = verify_certificate_chain(certificate_chain, policy.ark, datetime.datetime.fromtimestamp(now, datetime.timezone.utc))
    _check_vcek_matches_report(vcek, unverified)
    _check_signature(vcek, unverified)
    report = unverified

    if report.signing_key != SIGNING_KEY_VCEK:
        signer = SIGNING_KEY_NAMES.get(report.signing_key, f"reserved value {report.signing_key}")
        raise AttestationError(f"the report's signer info names the {signer} key, but only VCEK-signed reports are supported")
    if report.policy & POLICY_DEBUG and not policy.allow_debug:
        raise AttestationError("the guest policy allows debugging, so the host can read guest memory, and the trust policy forbids it")
    if report.policy & POLICY_MIGRATE_MA and not policy.allow_migration_agent:
        raise AttestationError("the guest policy allows a migration agent, and the trust policy forbids it")
    if report.vmpl != policy.vmpl:
        raise AttestationError(f"the report was requested at VMPL {report.vmpl}, expected VMPL {policy.vmpl}")
    if not report.reported_tcb.meets(policy.minimum_tcb):
        raise AttestationError(f"the reported TCB {report.reported_tcb} is below the minimum {policy.minimum_tcb}: the platform needs a firmware update")
    if not any(crypto.constant_time_equal(report.measurement, allowed) for allowed in policy.launch_measurements):
        raise AttestationError(f"launch measurement {report.measurement.hex()[:16]}... is not in the allowed set")
    if not crypto.constant_time_equal(report.report_data, expected_report_data):
        raise AttestationError("the report data does not match the expected key binding: the report was made for other claims")
    return report


def _check_signature(vcek: x509.Certificate, report: SnpReport) -> None:
    public_key = vcek.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # verify_certificate_chain checked it

    if not report.signature_r or not report.signature_s:
        raise AttestationError("the SEV-SNP report carries no signature (r or s is zero)")
    try:
        public_key.verify(encode_dss_signature(report.signature_r, report.signature_s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError("the SEV-SNP report signature does not verify under the VCEK") from None
