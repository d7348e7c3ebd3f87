"""A stand-in for AMD's SEV-SNP root of trust, for tests only.

No SEV-SNP hardware or AMD certificate is available to the test suite, so
these builders make everything a verifier needs with the algorithms AMD
uses: an ARK (self-signed) and an ASK, both RSA with RSASSA-PSS SHA-384
signatures, a VCEK (ECDSA P-384) that carries a chip id and TCB version as
extensions, and 0x4A0-byte attestation reports signed by that VCEK. The keys
are 2048-bit RSA rather than AMD's 4096 bits, to keep key generation fast.
"""

from __future__ import annotations

import datetime
import functools
import struct
import uuid
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from confide.schemas import sev_snp
from confide.schemas.sev_snp import TcbVersion

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes

NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
NOT_AFTER = datetime.datetime(2045, 1, 1, tzinfo=datetime.timezone.utc)
# Policy bit 17 is reserved and must be one; bit 16 allows SMT.
DEFAULT_GUEST_POLICY = (1 << 17) | (1 << 16)
CHIP_ID = bytes(range(0x40, 0x80))
TCB = TcbVersion(boot_loader=3, tee=0, snp=8, microcode=115)
LAUNCH_MEASUREMENT = bytes(range(48))


def pss_padding() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@dataclass(frozen=True)
class AmdRoot:
    """A test ARK and ASK: keys and DER certificates."""

    ark_key: rsa.RSAPrivateKey
    ark: bytes
    ask_key: rsa.RSAPrivateKey
    ask: bytes

    @property
    def ask_certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.ask)


@functools.lru_cache(maxsize=None)
def make_amd_root(product: str = "Test") -> AmdRoot:
    """Build (once per product name) a self-signed ARK and an ASK it signs."""
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark_name = _name(f"ARK-{product}")
    ask_name = _name(f"SEV-{product}")

    ark = _certificate(ark_name, ark_name, ark_key.public_key(), ark_key, extensions=[x509.BasicConstraints(ca=True, path_length=None)])
    ask = _certificate(ask_name, ark_name, ask_key.public_key(), ark_key, extensions=[x509.BasicConstraints(ca=True, path_length=0)])
    return AmdRoot(ark_key, ark.public_bytes(serialization.Encoding.DER), ask_key, ask.public_bytes(serialization.Encoding.DER))


def forge_root(imitated: AmdRoot, product: str = "Forger") -> AmdRoot:
    """Build an ASK with the names of `imitated`'s ASK and ARK but signed by another root's ARK key.

    The returned root's `ark` is the imitated ARK certificate, so a chain built
    from it looks right by name and fails only on the ASK's signature.
    """
    forger = make_amd_root(product)
    imitated_ask = imitated.ask_certificate
    ask = _certificate(
        imitated_ask.subject,
        imitated_ask.issuer,
        forger.ask_key.public_key(),
        forger.ark_key,
        extensions=[x509.BasicConstraints(ca=True, path_length=0)],
    )
    return AmdRoot(forger.ark_key, imitated.ark, forger.ask_key, ask.public_bytes(serialization.Encoding.DER))


def der_integer(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return bytes([0x02, len(body)]) + body


def make_vcek(
    root: AmdRoot,
    chip_id: bytes = CHIP_ID,
    tcb: TcbVersion = TCB,
    hardware_id_encoding: str = "raw",
    not_after: datetime.datetime = NOT_AFTER,
    omit: frozenset[str] = frozenset(),
    signer_key: rsa.RSAPrivateKey | None = None,
    rsa_padding: padding.AsymmetricPadding | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """Build a VCEK key and its certificate, issued by the root's ASK unless `signer_key` is given."""
    key = ec.generate_private_key(ec.SECP384R1())
    hardware_id = chip_id if hardware_id_encoding == "raw" else b"\x04\x40" + chip_id
    extension_values = {
        "blSPL": (sev_snp.OID_BOOT_LOADER_SPL, der_integer(tcb.boot_loader)),
        "teeSPL": (sev_snp.OID_TEE_SPL, der_integer(tcb.tee)),
        "snpSPL": (sev_snp.OID_SNP_SPL, der_integer(tcb.snp)),
        "ucodeSPL": (sev_snp.OID_MICROCODE_SPL, der_integer(tcb.microcode)),
        "hwID": (sev_snp.OID_HARDWARE_ID, hardware_id),
    }
    extensions = [x509.UnrecognizedExtension(oid, value) for name, (oid, value) in extension_values.items() if name not in omit]

    certificate = _certificate(
        _name("SEV-VCEK"),
        root.ask_certificate.subject,
        key.public_key(),
        signer_key or root.ask_key,
        extensions=extensions,
        not_after=not_after,
        rsa_padding=rsa_padding,
    )
    return key, certificate.public_bytes(serialization.Encoding.DER)


def build_report(
    report_data: bytes,
    measurement: bytes = LAUNCH_MEASUREMENT,
    chip_id: bytes = CHIP_ID,
    reported_tcb: TcbVersion = TCB,
    version: int = 2,
    policy: int = DEFAULT_GUEST_POLICY,
    vmpl: int = 0,
    signature_algorithm: int = 1,
    signer_info: int = 0,
) -> bytearray:
    """Lay out an unsigned report with the given fields and recognisable bytes elsewhere."""
    report = bytearray(sev_snp.REPORT_SIZE)
    struct.pack_into("<IIQ", report, 0x00, version, 7, policy)
    report[0x10:0x20] = b"F" * 16
    report[0x20:0x30] = b"I" * 16
    struct.pack_into("<II", report, 0x30, vmpl, signature_algorithm)
    report[0x38:0x40] = reported_tcb.to_bytes()
    struct.pack_into("<QI", report, 0x40, 0b11, signer_info)
    report[0x50:0x90] = report_data
    report[0x90:0xC0] = measurement
    report[0xC0:0xE0] = b"H" * 32
    report[0xE0:0x110] = b"D" * 48
    report[0x110:0x140] = b"A" * 48
    report[0x140:0x160] = b"R" * 32
    report[0x160:0x180] = b"M" * 32
    report[0x180:0x188] = reported_tcb.to_bytes()
    report[0x1A0:0x1E0] = chip_id
    return report


def sign_report(report: bytearray, vcek_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign bytes 0x000 to 0x29F and store r and s little-endian, zero-padded to 72 bytes."""
    r, s = decode_dss_signature(vcek_key.sign(bytes(report[: sev_snp.SIGNED_SIZE]), ec.ECDSA(hashes.SHA384())))
    report[0x2A0:0x2E8] = r.to_bytes(72, "little")
    report[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(report)


def certificate_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """Build a GHCB certificate table: (GUID, offset, length) entries, a zero entry, then the certificates."""
    header_size = (len(entries) + 1) * 24
    header = bytearray()
    body = bytearray()
    for guid, der in entries:
        header += guid + struct.pack("<II", header_size + len(body), len(der))
        body += der
    header += bytes(24)
    return bytes(header + body)


@dataclass
class FakeSnpFirmware:
    """Signs reports over any report data, the way the AMD secure processor would."""

    root: AmdRoot = field(default_factory=make_amd_root)
    chip_id: bytes = CHIP_ID
    tcb: TcbVersion = TCB
    measurement: bytes = LAUNCH_MEASUREMENT

    def __post_init__(self) -> None:
        self.vcek_key, self.vcek = make_vcek(self.root, self.chip_id, self.tcb)

    @property
    def chain(self) -> tuple[bytes, bytes, bytes]:
        return (self.vcek, self.root.ask, self.root.ark)

    def report(self, report_data: bytes, **fields: object) -> bytes:
        fields.setdefault("measurement", self.measurement)
        fields.setdefault("chip_id", self.chip_id)
        fields.setdefault("reported_tcb", self.tcb)
        return sign_report(build_report(report_data, **fields), self.vcek_key)

    def certificate_table(self) -> bytes:
        return certificate_table([(VCEK_GUID, self.vcek), (ASK_GUID, self.root.ask), (ARK_GUID, self.root.ark)])


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "confide test root (not AMD)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: object,
    signer_key: rsa.RSAPrivateKey,
    extensions: list[x509.ExtensionType],
    not_after: datetime.datetime = NOT_AFTER,
    rsa_padding: padding.AsymmetricPadding | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(not_after)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer_key, hashes.SHA384(), rsa_padding=rsa_padding or pss_padding())
