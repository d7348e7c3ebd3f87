"""Tests of the SEV-SNP report verifier in schemas/sev_snp.py.

No SEV-SNP hardware or AMD certificate is available here: every root, chain
and report comes from tests/sev_snp_fakes.py, which builds them with the
algorithms AMD uses. A pass shows the verifier is consistent with those
builders and with the published layout, not that it accepts a real report.
"""

from __future__ import annotations

import datetime
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import padding
from sev_snp_fakes import (
    CHIP_ID,
    DEFAULT_GUEST_POLICY,
    LAUNCH_MEASUREMENT,
    TCB,
    FakeSnpFirmware,
    build_report,
    forge_root,
    make_amd_root,
    make_vcek,
    sign_report,
)

from confide.schemas import sev_snp
from confide.schemas.sev_snp import (
    REPORT_SIZE,
    SnpTrustPolicy,
    TcbVersion,
    parse_report,
    verify_certificate_chain,
    verify_report,
)
from confide.errors import AttestationError
from confide.schemas import crypto
from confide.schemas.attestation import TrustPolicy, verify_document, verify_with_steps
from confide.schemas.codec import encode
from confide.schemas.messages import AttestationBody, SignedDocument
from confide.schemas.hardware import HardwareDocument

REPORT_DATA = bytes(range(100, 164))
RUNTIME_MEASUREMENT = bytes(range(200, 232))
ISSUED_AT = 1_750_000_000


@pytest.fixture(scope="module")
def firmware() -> FakeSnpFirmware:
    return FakeSnpFirmware()


@pytest.fixture(scope="module")
def policy(firmware) -> SnpTrustPolicy:
    return SnpTrustPolicy(
        ark=firmware.root.ark,
        launch_measurements=frozenset({LAUNCH_MEASUREMENT}),
        minimum_tcb=TcbVersion(boot_loader=3, tee=0, snp=8, microcode=100),
    )


@pytest.fixture(scope="module")
def good_report(firmware) -> bytes:
    return firmware.report(REPORT_DATA)


def flip(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


# -- a good report ----------------------------------------------------------------------


def test_good_report_verifies(firmware, policy, good_report):
    """A report signed by the VCEK of a chain under the pinned ARK verifies."""
    report = verify_report(good_report, firmware.chain, policy, REPORT_DATA)

    assert report.report_data == REPORT_DATA
    assert report.measurement == LAUNCH_MEASUREMENT
    assert report.chip_id == CHIP_ID
    assert report.reported_tcb == TCB


def test_chain_without_ark_verifies(firmware, policy, good_report):
    """A chain of just VCEK and ASK verifies, because the ARK is pinned."""
    report = verify_report(good_report, firmware.chain[:2], policy, REPORT_DATA)

    assert report.vmpl == 0


def test_parse_reads_every_field_at_its_offset(good_report):
    """parse_report reads each field from the offset of the published layout."""
    report = parse_report(good_report)

    assert report.version == 2
    assert report.guest_svn == 7
    assert report.policy == DEFAULT_GUEST_POLICY
    assert report.family_id == b"F" * 16
    assert report.image_id == b"I" * 16
    assert report.vmpl == 0
    assert report.signature_algorithm == 1
    assert report.platform_version == TCB
    assert report.platform_info == 0b11
    assert report.signer_info == 0
    assert report.report_data == REPORT_DATA
    assert report.measurement == LAUNCH_MEASUREMENT
    assert report.host_data == b"H" * 32
    assert report.id_key_digest == b"D" * 48
    assert report.author_key_digest == b"A" * 48
    assert report.report_id == b"R" * 32
    assert report.report_id_ma == b"M" * 32
    assert report.reported_tcb == TCB
    assert report.chip_id == CHIP_ID
    assert report.signed_bytes == good_report[:0x2A0]
    assert report.signature_r.to_bytes(72, "little") == good_report[0x2A0:0x2E8]
    assert report.signature_s.to_bytes(72, "little") == good_report[0x2E8:0x330]


def test_tcb_version_layout():
    """A TCB version reads boot loader, TEE, SNP and microcode from bytes 0, 1, 6 and 7."""
    tcb = TcbVersion.from_bytes(bytes([1, 2, 0, 0, 0, 0, 3, 4]))

    assert tcb == TcbVersion(boot_loader=1, tee=2, snp=3, microcode=4)
    assert tcb.to_bytes() == bytes([1, 2, 0, 0, 0, 0, 3, 4])
    assert tcb.meets(TcbVersion(1, 2, 3, 4))
    assert not tcb.meets(TcbVersion(1, 2, 3, 5))
    assert not tcb.meets(TcbVersion(2, 0, 0, 0))


# -- tampering ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset",
    [0x04, 0x10, 0x20, 0x40, 0x4C, 0xC0, 0xE0, 0x110, 0x140, 0x160, 0x188, 0x1E0, 0x29F],
    ids=lambda offset: f"0x{offset:03X}",
)
def test_flipped_signed_byte_rejected(firmware, policy, good_report, offset):
    """One flipped bit anywhere in bytes 0x000 to 0x29F breaks the signature."""
    with pytest.raises(AttestationError, match="signature does not verify under the VCEK"):
        verify_report(flip(good_report, offset), firmware.chain, policy, REPORT_DATA)


@pytest.mark.parametrize("offset", [0x2A0, 0x2C0, 0x2CF, 0x2E8, 0x300, 0x317], ids=lambda offset: f"0x{offset:03X}")
def test_flipped_signature_byte_rejected(firmware, policy, good_report, offset):
    """One flipped bit in r or s fails verification."""
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_report(flip(good_report, offset), firmware.chain, policy, REPORT_DATA)


def test_flipped_measurement_rejected(firmware, policy, good_report):
    """A changed launch measurement breaks the signature."""
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_report(flip(good_report, 0x90 + 20), firmware.chain, policy, REPORT_DATA)


def test_flipped_report_data_rejected(firmware, policy, good_report):
    """A changed report data byte breaks the signature."""
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_report(flip(good_report, 0x50 + 63), firmware.chain, policy, REPORT_DATA)


def test_nonzero_signature_padding_rejected(firmware, policy, good_report):
    """Bytes past the 48-byte P-384 scalar in r or s must be zero."""
    with pytest.raises(AttestationError, match="non-zero bytes in the padding"):
        verify_report(flip(good_report, 0x2A0 + 50), firmware.chain, policy, REPORT_DATA)
    with pytest.raises(AttestationError, match="non-zero bytes in the padding"):
        verify_report(flip(good_report, 0x2E8 + 71), firmware.chain, policy, REPORT_DATA)


def test_nonzero_bytes_after_signature_rejected(firmware, policy, good_report):
    """The reserved bytes after r and s must be zero."""
    with pytest.raises(AttestationError, match="after its signature"):
        verify_report(flip(good_report, 0x4A0 - 1), firmware.chain, policy, REPORT_DATA)


def test_missing_signature_rejected(firmware, policy, good_report):
    """A report whose signature is all zero fails as unsigned."""
    unsigned = good_report[:0x2A0] + bytes(REPORT_SIZE - 0x2A0)

    with pytest.raises(AttestationError, match="carries no signature"):
        verify_report(unsigned, firmware.chain, policy, REPORT_DATA)


# -- the expected values ---------------------------------------------------------------------------


def test_other_report_data_rejected(firmware, policy):
    """A well-signed report made for other report data fails the key binding."""
    report = firmware.report(bytes(64))

    with pytest.raises(AttestationError, match="report data does not match the expected key binding"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_unknown_measurement_rejected(firmware, policy):
    """A well-signed report with a launch measurement not in the policy fails."""
    report = firmware.report(REPORT_DATA, measurement=b"\xee" * 48)

    with pytest.raises(AttestationError, match="launch measurement eeeeeeee.* is not in the allowed set"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_empty_measurement_set_rejected(firmware, policy, good_report):
    """A policy with no launch measurements fails: there is nothing to compare."""
    empty = SnpTrustPolicy(policy.ark, frozenset(), policy.minimum_tcb)

    with pytest.raises(AttestationError, match="no allowed SEV-SNP launch measurements"):
        verify_report(good_report, firmware.chain, empty, REPORT_DATA)


def test_missing_expected_report_data_rejected(firmware, policy, good_report):
    """Empty or short expected report data fails before anything is compared."""
    for expected in (b"", REPORT_DATA[:32]):
        with pytest.raises(AttestationError, match="64 are required to compare"):
            verify_report(good_report, firmware.chain, policy, expected)


def test_missing_pinned_ark_rejected(firmware, policy, good_report):
    """A policy without an ARK fails: no chain can end anywhere."""
    unpinned = SnpTrustPolicy(b"", policy.launch_measurements, policy.minimum_tcb)

    with pytest.raises(AttestationError, match="no AMD root key"):
        verify_report(good_report, firmware.chain, unpinned, REPORT_DATA)


# -- the guest policy and platform -----------------------------------------------------------------


def test_debug_policy_rejected_unless_allowed(firmware, policy):
    """A guest whose policy allows debugging fails unless the trust policy allows it."""
    report = firmware.report(REPORT_DATA, policy=DEFAULT_GUEST_POLICY | sev_snp.POLICY_DEBUG)
    permissive = SnpTrustPolicy(**{**policy.__dict__, "allow_debug": True})

    with pytest.raises(AttestationError, match="allows debugging"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)
    assert verify_report(report, firmware.chain, permissive, REPORT_DATA).policy & sev_snp.POLICY_DEBUG


def test_migration_agent_rejected_unless_allowed(firmware, policy):
    """A guest whose policy allows a migration agent fails unless the trust policy allows it."""
    report = firmware.report(REPORT_DATA, policy=DEFAULT_GUEST_POLICY | sev_snp.POLICY_MIGRATE_MA)
    permissive = SnpTrustPolicy(**{**policy.__dict__, "allow_migration_agent": True})

    with pytest.raises(AttestationError, match="migration agent"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)
    assert verify_report(report, firmware.chain, permissive, REPORT_DATA).vmpl == 0


def test_other_vmpl_rejected(firmware, policy):
    """A report requested at another VMPL than the policy's fails."""
    report = firmware.report(REPORT_DATA, vmpl=2)

    with pytest.raises(AttestationError, match="requested at VMPL 2, expected VMPL 0"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_vlek_signed_report_rejected(firmware, policy):
    """A report whose signer info names the VLEK fails: only VCEK reports are supported."""
    report = firmware.report(REPORT_DATA, signer_info=1 << 2)

    with pytest.raises(AttestationError, match="signer info names the VLEK key"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_tcb_below_minimum_rejected(policy):
    """A report whose reported TCB is below the minimum fails with both versions."""
    old = TcbVersion(boot_loader=3, tee=0, snp=8, microcode=99)
    firmware = FakeSnpFirmware(tcb=old)
    report = firmware.report(REPORT_DATA)

    with pytest.raises(AttestationError, match="below the minimum.*firmware update"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


# -- the report's structure --------------------------------------------------------------------------


def test_truncated_report_rejected(firmware, policy, good_report):
    """A truncated or padded report fails with its size and the expected size."""
    for size in (0, 0x2A0, REPORT_SIZE - 1):
        with pytest.raises(AttestationError, match=f"is {size} bytes, expected 1184 \\(0x4A0\\): it is truncated"):
            verify_report(good_report[:size], firmware.chain, policy, REPORT_DATA)
    with pytest.raises(AttestationError, match="is 1185 bytes"):
        verify_report(good_report + b"\x00", firmware.chain, policy, REPORT_DATA)


def test_unsupported_version_rejected(firmware, policy):
    """A report version other than 2 or 3 fails with the version."""
    report = firmware.report(REPORT_DATA, version=1)

    with pytest.raises(AttestationError, match="version 1 is not supported"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_other_signature_algorithm_rejected(firmware, policy):
    """A report that names another signature algorithm fails."""
    report = firmware.report(REPORT_DATA, signature_algorithm=2)

    with pytest.raises(AttestationError, match="algorithm 2 is not ECDSA P-384"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_non_bytes_report_rejected(firmware, policy):
    """A report that is not bytes fails with its type."""
    with pytest.raises(AttestationError, match="must be bytes, got str"):
        verify_report("report", firmware.chain, policy, REPORT_DATA)


# -- the certificate chain ------------------------------------------------------------------------------


def test_chain_from_other_root_rejected(policy):
    """A full chain and report under another ARK fail against the pinned ARK."""
    stranger = FakeSnpFirmware(root=make_amd_root("Other"))
    report = stranger.report(REPORT_DATA)

    with pytest.raises(AttestationError, match="ASK certificate's issuer is not the ARK's subject"):
        verify_report(report, stranger.chain[:2], policy, REPORT_DATA)
    with pytest.raises(AttestationError, match="differs from the pinned ARK"):
        verify_report(report, stranger.chain, policy, REPORT_DATA)


def test_ask_signed_by_other_root_rejected(firmware, policy):
    """An ASK with the pinned chain's names but signed by another root's key fails."""
    forged = forge_root(firmware.root)
    vcek_key, vcek = make_vcek(forged)
    report = sign_report(build_report(REPORT_DATA), vcek_key)

    with pytest.raises(AttestationError, match="ASK certificate's signature does not verify under the ARK's key"):
        verify_report(report, (vcek, forged.ask), policy, REPORT_DATA)
    with pytest.raises(AttestationError, match="ASK certificate's signature does not verify"):
        verify_report(report, (vcek, forged.ask, forged.ark), policy, REPORT_DATA)


def test_vcek_signed_by_other_ask_rejected(firmware, policy):
    """A VCEK that names the ASK but was signed by another key fails."""
    other = make_amd_root("Other")
    vcek_key, vcek = make_vcek(firmware.root, signer_key=other.ask_key)
    report = sign_report(build_report(REPORT_DATA), vcek_key)

    with pytest.raises(AttestationError, match="VCEK certificate's signature does not verify under the ASK"):
        verify_report(report, (vcek, firmware.root.ask), policy, REPORT_DATA)


def test_report_signed_by_other_vcek_rejected(firmware, policy):
    """A report signed by a different VCEK than the chain's fails."""
    other_key, _ = make_vcek(firmware.root)
    report = sign_report(build_report(REPORT_DATA), other_key)

    with pytest.raises(AttestationError, match="signature does not verify under the VCEK"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_pkcs1_signed_vcek_rejected(firmware, policy):
    """A VCEK signed with RSA PKCS#1 v1.5 fails: AMD's chain uses RSASSA-PSS only."""
    vcek_key, vcek = make_vcek(firmware.root, rsa_padding=padding.PKCS1v15())
    report = sign_report(build_report(REPORT_DATA), vcek_key)

    with pytest.raises(AttestationError, match="not signed with RSASSA-PSS"):
        verify_report(report, (vcek, firmware.root.ask), policy, REPORT_DATA)


def test_expired_vcek_rejected(firmware, policy):
    """A VCEK past its validity fails with the expiry time."""
    expired = datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc)
    vcek_key, vcek = make_vcek(firmware.root, not_after=expired)
    report = sign_report(build_report(REPORT_DATA), vcek_key)

    with pytest.raises(AttestationError, match="VCEK certificate expired at 2021-01-01"):
        verify_report(report, (vcek, firmware.root.ask), policy, REPORT_DATA)


def test_too_short_or_long_chain_rejected(firmware, policy, good_report):
    """A chain of fewer than 2 or more than 3 certificates fails."""
    with pytest.raises(AttestationError, match="carries 0 certificate"):
        verify_report(good_report, (), policy, REPORT_DATA)
    with pytest.raises(AttestationError, match="carries 1 certificate"):
        verify_report(good_report, firmware.chain[:1], policy, REPORT_DATA)
    with pytest.raises(AttestationError, match="carries 4 certificates"):
        verify_report(good_report, firmware.chain + (firmware.root.ark,), policy, REPORT_DATA)


def test_garbage_certificate_rejected(firmware, policy, good_report):
    """Bytes that are not DER X.509 fail with the certificate's role."""
    with pytest.raises(AttestationError, match="VCEK certificate is not a valid DER"):
        verify_report(good_report, (b"not a certificate", firmware.root.ask), policy, REPORT_DATA)


def test_chain_order_checked(firmware):
    """Passing ASK and VCEK in the wrong order fails on the issuer names."""
    with pytest.raises(AttestationError, match="issuer"):
        verify_certificate_chain((firmware.root.ask, firmware.vcek), firmware.root.ark, datetime.datetime.now(datetime.timezone.utc))


# -- the VCEK extensions ------------------------------------------------------------------------------------


def test_hardware_id_as_octet_string_accepted(firmware, policy):
    """A hwID extension encoded as a DER OCTET STRING is read like a raw one."""
    vcek_key, vcek = make_vcek(firmware.root, hardware_id_encoding="octet-string")
    report = sign_report(build_report(REPORT_DATA), vcek_key)

    assert verify_report(report, (vcek, firmware.root.ask), policy, REPORT_DATA).chip_id == CHIP_ID


def test_other_chip_rejected(firmware, policy):
    """A report whose chip id differs from the VCEK's hwID fails."""
    report = firmware.report(REPORT_DATA, chip_id=b"\x01" * 64)

    with pytest.raises(AttestationError, match="chip id differs from the VCEK's hwID"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_masked_chip_id_rejected(firmware, policy):
    """A report with a masked (all-zero) chip id cannot be tied to a VCEK."""
    report = firmware.report(REPORT_DATA, chip_id=bytes(64))

    with pytest.raises(AttestationError, match="chip id is masked"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


def test_reported_tcb_differs_from_vcek_rejected(firmware, policy):
    """A report whose reported TCB is not the one the VCEK was issued for fails."""
    report = firmware.report(REPORT_DATA, reported_tcb=TcbVersion(3, 0, 9, 115))

    with pytest.raises(AttestationError, match="differs from the VCEK's TCB"):
        verify_report(report, firmware.chain, policy, REPORT_DATA)


@pytest.mark.parametrize("extension", ["hwID", "blSPL", "teeSPL", "snpSPL", "ucodeSPL"])
def test_missing_vcek_extension_rejected(firmware, policy, extension):
    """A VCEK without one of the hwID or TCB extensions fails, naming it."""
    vcek_key, vcek = make_vcek(firmware.root, omit=frozenset({extension}))
    report = sign_report(build_report(REPORT_DATA), vcek_key)

    with pytest.raises(AttestationError, match=f"lacks the {extension} extension"):
        verify_report(report, (vcek, firmware.root.ask), policy, REPORT_DATA)


# -- hardware documents through the shared verifier ------------------------------------------------------


def make_document(firmware: FakeSnpFirmware, **overrides: object) -> HardwareDocument:
    claims = {
        "platform": "sev-snp",
        "purpose": "pool",
        "key": bytes(range(32)),
        "measurement": RUNTIME_MEASUREMENT,
        "model": "SmolLM2-135M-Instruct",
        "issued_at": ISSUED_AT,
        "expires_at": ISSUED_AT + 3600,
        "report": b"\x00",
        "certificates": firmware.chain,
    }
    claims.update(overrides)
    unsigned = HardwareDocument(**claims)
    report = claims["report"] if "report" in overrides else firmware.report(unsigned.report_data())
    return HardwareDocument(**{**claims, "report": report})


@pytest.fixture(scope="module")
def trust(policy) -> TrustPolicy:
    """A device policy that pins only the SEV-SNP root and allows the runtime measurement."""
    return TrustPolicy(platform_keys={}, measurements=frozenset({RUNTIME_MEASUREMENT}), sev_snp=policy)


def test_document_verifies(firmware, trust):
    """A document whose report binds its claims verifies, and each step is reported."""
    document = make_document(firmware)
    steps = []

    verified = verify_with_steps(document.to_wire(), trust, "pool", now=ISSUED_AT + 60, report=lambda step, detail: steps.append((step, detail)))

    assert verified.body == document.claims()
    assert verified.body.key == document.key
    assert [step for step, _ in steps] == ["document", "signature", "platform", "measurement", "freshness", "key"]
    assert "SEV-SNP" in dict(steps)["platform"]
    assert "SIMULATED" not in dict(steps)["platform"]


def test_document_changed_claim_rejected(firmware, trust):
    """Changing any claim after the report was made breaks the key binding."""
    document = make_document(firmware)
    changes = {
        "key": bytes(32),
        "model": "other-model",
        "issued_at": ISSUED_AT + 1,
        "expires_at": ISSUED_AT + 7200,
        "purpose": "join",
        "measurement": bytes(32),
        "dev_mode": True,
    }

    for name, value in changes.items():
        changed = HardwareDocument(**{**document.__dict__, name: value})
        with pytest.raises(AttestationError, match="report data does not match"):
            verify_document(changed.to_wire(), trust, "pool", now=ISSUED_AT + 60)


def test_document_unknown_runtime_measurement_rejected(firmware, trust):
    """A document that binds a confide measurement outside the policy fails."""
    document = make_document(firmware, measurement=bytes(32))

    with pytest.raises(AttestationError, match="measurement 0000.* is not in the allowed set"):
        verify_document(document.to_wire(), trust, "pool", now=ISSUED_AT + 60)


def test_document_dev_mode_rejected_unless_allowed(firmware, trust):
    """A development-mode worker's report binds the flag, and the device refuses it without --allow-dev."""
    document = make_document(firmware, dev_mode=True)

    with pytest.raises(AttestationError, match="development mode"):
        verify_document(document.to_wire(), trust, "pool", now=ISSUED_AT + 60)
    assert verify_document(document.to_wire(), replace(trust, allow_dev=True), "pool", now=ISSUED_AT + 60).dev_mode


def test_document_freshness_and_purpose_checked(firmware, trust):
    """A stale, future, expired or wrong-purpose document fails with its own message."""
    wire = make_document(firmware).to_wire()

    with pytest.raises(AttestationError, match="stale"):
        verify_document(wire, trust, "pool", now=ISSUED_AT + 3600 + 121)
    with pytest.raises(AttestationError, match="in the future"):
        verify_document(wire, trust, "pool", now=ISSUED_AT - 121)
    with pytest.raises(AttestationError, match="binds a 'pool' key, expected 'join'"):
        verify_document(wire, trust, "join", now=ISSUED_AT + 60)
    short_lived = make_document(firmware, expires_at=ISSUED_AT + 10)
    with pytest.raises(AttestationError, match="expired"):
        verify_document(short_lived.to_wire(), trust, "pool", now=ISSUED_AT + 200)


def test_document_without_certificates_rejected(firmware, trust):
    """A document without a VCEK and ASK fails, because nothing can be fetched."""
    document = make_document(firmware, certificates=())

    with pytest.raises(AttestationError, match="carries 0 certificate"):
        verify_document(document.to_wire(), trust, "pool", now=ISSUED_AT + 60)


def test_document_other_platform_or_malformed_rejected(firmware, trust):
    """A TDX document and bytes that are no document both fail clearly."""
    tdx = HardwareDocument("tdx", "pool", bytes(32), RUNTIME_MEASUREMENT, "m", ISSUED_AT, ISSUED_AT + 60, b"quote")
    malformed = encode({"v": 1, "type": "hardware_attestation", "platform": "sev-snp"})

    with pytest.raises(AttestationError, match="cannot verify 'tdx' reports"):
        verify_document(tdx.to_wire(), trust, "pool", now=ISSUED_AT)
    with pytest.raises(AttestationError, match="hardware attestation document is malformed"):
        verify_document(malformed, trust, "pool", now=ISSUED_AT)


def test_document_without_pinned_root_rejected(firmware, trust):
    """A device whose policy pins no AMD root refuses SEV-SNP documents: nothing to compare is a failure."""
    unpinned = replace(trust, sev_snp=None)

    with pytest.raises(AttestationError, match="pins no AMD root"):
        verify_document(make_document(firmware).to_wire(), unpinned, "pool", now=ISSUED_AT + 60)


def test_document_empty_measurements_rejected(firmware, trust):
    """A policy with no confide measurements and no log fails: there is nothing to compare."""
    empty = replace(trust, measurements=frozenset())

    with pytest.raises(AttestationError, match="lists no allowed measurements"):
        verify_document(make_document(firmware).to_wire(), empty, "pool", now=ISSUED_AT + 60)


def test_simulated_document_rejected_by_sev_snp_policy(firmware, trust):
    """A simulated document fails against a policy that pins only the SEV-SNP root."""
    platform_key = crypto.SigningKey.generate()
    body = AttestationBody("simulated", True, RUNTIME_MEASUREMENT, "pool", bytes(32), ISSUED_AT, ISSUED_AT + 60, "m").to_bytes()
    wire = SignedDocument(body, platform_key.sign(body)).to_wire()

    with pytest.raises(AttestationError, match="no pinned root key for platform 'simulated'"):
        verify_document(wire, trust, "pool", now=ISSUED_AT)
