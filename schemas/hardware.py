"""The hardware attestation document: a TEE's raw report plus the claims it binds.

A SignedDocument (schemas/messages.py) carries a body signed by the
simulated platform's Ed25519 key. Real hardware signs a report in its own
format instead, and the only field of that report the worker controls is
the 64-byte report data. A HardwareDocument therefore carries the claims in
clear (purpose, key, measurement, model, validity) next to the raw report,
and the report data is a hash over exactly those claims:

    report_data = BLAKE2b-512(personal="confide:rdata:v1",
                              msgpack(["confide-report-data", 1, platform,
                                       purpose, key, measurement, model,
                                       issued_at, expires_at, dev_mode]))

A verifier checks the report's signature chain, then recomputes this hash
from the document's fields and compares it with the report's report data.
Until then every field of the document is unverified.

Wire form, a msgpack map:

    {"v": 1, "type": "hardware_attestation",
     "platform": "sev-snp" | "tdx", "provider": "sev_guest" | "tdx_guest",
     "purpose", "key", "key_id", "measurement", "model",
     "issued_at", "expires_at",
     "report": raw report bytes as the kernel returned them,
     "certs": [DER certificates, the report signer first],
     "dev_mode": true (present only for a development-mode worker),
     "release": release log evidence (optional, as in "attestation")}

"release" is outside the report data: the log's own signature
authenticates it, as for a simulated document.

For SEV-SNP, "certs" is [VCEK, ASK] or [VCEK, ASK, ARK] when the host
supplies them. For TDX it is empty, because a TDX quote embeds its own
certification data.
"""

from __future__ import annotations

from dataclasses import dataclass

from confide.errors import DecodeError
from confide.schemas import crypto
from confide.schemas.codec import Fields, decode, encode
from confide.schemas.messages import KEY_ID_SIZE, MAX_DOCUMENT, PROTOCOL_VERSION, PURPOSES, AttestationBody, ReleaseEvidence, key_id_for

REPORT_DATA_SIZE = 64
REPORT_DATA_PERSON = b"confide:rdata:v1"
MEASUREMENT_SIZE = 32

# The configfs-tsm provider name that produces each platform's reports.
PROVIDERS = {"sev-snp": "sev_guest", "tdx": "tdx_guest"}
HARDWARE_PLATFORMS = frozenset(PROVIDERS)

# configfs-tsm limits an outblob to 32 KiB (TSM_OUTBLOB_MAX in include/linux/tsm.h).
MAX_REPORT = 32 * 1024
MAX_CERTIFICATE = 8 * 1024
MAX_CERTIFICATES = 3
# The rest: the claims, and release evidence up to MAX_DOCUMENT (schemas/messages.py).
MAX_HARDWARE_DOCUMENT = MAX_REPORT + MAX_CERTIFICATES * MAX_CERTIFICATE + MAX_DOCUMENT + 1024


def report_data_for(
    platform: str,
    purpose: str,
    key: bytes,
    measurement: bytes,
    model: str,
    issued_at: int,
    expires_at: int,
    dev_mode: bool = False,
) -> bytes:
    """Compute the 64 bytes of report data that bind these claims to a hardware report."""
    claims = encode(["confide-report-data", PROTOCOL_VERSION, platform, purpose, key, measurement, model, issued_at, expires_at, dev_mode])
    return crypto.digest(claims, REPORT_DATA_PERSON, REPORT_DATA_SIZE)


@dataclass(frozen=True, repr=False)
class HardwareDocument:
    """A TEE's raw attestation report with the claims its report data binds."""

    platform: str
    purpose: str
    key: bytes
    measurement: bytes
    model: str
    issued_at: int
    expires_at: int
    report: bytes
    certificates: tuple[bytes, ...] = ()
    dev_mode: bool = False
    release: ReleaseEvidence | None = None

    @property
    def provider(self) -> str:
        return PROVIDERS[self.platform]

    @property
    def key_id(self) -> bytes:
        return key_id_for(self.key)

    def report_data(self) -> bytes:
        """Return the report data that the document's claims require the report to carry."""
        return report_data_for(
            self.platform, self.purpose, self.key, self.measurement, self.model, self.issued_at, self.expires_at, self.dev_mode
        )

    def claims(self) -> AttestationBody:
        """Return the claims as the body a simulated document would sign; unverified until the report is."""
        return AttestationBody(
            platform=self.platform,
            simulated=False,
            measurement=self.measurement,
            purpose=self.purpose,
            key=self.key,
            issued_at=self.issued_at,
            expires_at=self.expires_at,
            model=self.model,
            dev_mode=self.dev_mode,
        )

    def to_wire(self) -> bytes:
        document: dict[str, object] = {
            "v": PROTOCOL_VERSION,
            "type": "hardware_attestation",
            "platform": self.platform,
            "provider": self.provider,
            "purpose": self.purpose,
            "key": self.key,
            "key_id": self.key_id,
            "measurement": self.measurement,
            "model": self.model,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "report": self.report,
            "certs": list(self.certificates),
        }
        if self.dev_mode:
            document["dev_mode"] = True
        if self.release is not None:
            document["release"] = self.release.to_map()
        return encode(document)

    @classmethod
    def from_wire(cls, data: bytes) -> HardwareDocument:
        fields = Fields(
            decode(data, MAX_HARDWARE_DOCUMENT),
            "hardware_attestation",
            {"v", "type", "platform", "provider", "purpose", "key", "key_id", "measurement", "model", "issued_at", "expires_at", "report", "certs"},
            frozenset({"dev_mode", "release"}),
            version=PROTOCOL_VERSION,
        )
        fields.string("type", choices=frozenset({"hardware_attestation"}))
        platform = fields.string("platform", 32, HARDWARE_PLATFORMS)
        if fields.string("provider", 32) != PROVIDERS[platform]:
            raise DecodeError("inconsistent", f"hardware_attestation.provider does not match platform '{platform}'")

        document = cls(
            platform=platform,
            purpose=fields.string("purpose", 16, PURPOSES),
            key=fields.binary("key", size=crypto.KEY_SIZE),
            measurement=fields.binary("measurement", size=MEASUREMENT_SIZE),
            model=fields.string("model", 256),
            issued_at=fields.integer("issued_at", 0, 2**40),
            expires_at=fields.integer("expires_at", 0, 2**40),
            report=fields.binary("report", min_size=1, max_size=MAX_REPORT),
            certificates=_decode_certificates(fields.array("certs", MAX_CERTIFICATES)),
            dev_mode=fields.boolean("dev_mode") if fields.has("dev_mode") else False,
            release=ReleaseEvidence.from_map(fields.raw("release")) if fields.has("release") else None,
        )
        if not crypto.constant_time_equal(fields.binary("key_id", size=KEY_ID_SIZE), document.key_id):
            raise DecodeError("inconsistent", "hardware_attestation.key_id does not match its key")
        return document

    def __repr__(self) -> str:
        return (
            f"HardwareDocument(platform={self.platform}, purpose={self.purpose}, key_id={self.key_id.hex()}, "
            f"report=[{len(self.report)} bytes], certificates={len(self.certificates)}, release={'yes' if self.release else 'no'})"
        )


def _decode_certificates(items: list[object]) -> tuple[bytes, ...]:
    certificates = []
    for position, item in enumerate(items):
        if not isinstance(item, bytes):
            raise DecodeError("wrong_type", f"hardware_attestation.certs[{position}] must be binary")
        if not 1 <= len(item) <= MAX_CERTIFICATE:
            raise DecodeError("wrong_size", f"hardware_attestation.certs[{position}] must be 1 to {MAX_CERTIFICATE} bytes, got {len(item)}")
        certificates.append(item)
    return tuple(certificates)
