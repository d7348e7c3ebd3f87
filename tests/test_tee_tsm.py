"""Tests of the configfs-tsm TEE backend and of the HardwareDocument it returns.

There is no SEV-SNP or TDX hardware here. Each test builds a fake configfs
tree in a temporary directory, and FakeTsmKernel plays the kernel's part:
when the backend writes inblob, it bumps generation and writes an outblob
that tests/sev_snp_fakes.py signs over the written report data. These tests
therefore check the backend's use of the documented ABI, not real hardware.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
from sev_snp_fakes import ARK_GUID, ASK_GUID, LAUNCH_MEASUREMENT, VCEK_GUID, FakeSnpFirmware, certificate_table

from confide.schemas.attestation import TrustPolicy, verify_document
from confide.schemas.sev_snp import SnpTrustPolicy, TcbVersion
from confide.errors import DecodeError, TeeError
from confide.schemas.codec import decode, encode
from confide.schemas.hardware import HardwareDocument, report_data_for
from confide.workers.tee_tsm import ConfigfsTsmTee, parse_certificate_table

NOW = 1_750_000_000
MEASUREMENT = bytes(range(32))
POOL_KEY = bytes(range(32, 64))
MODEL = "SmolLM2-135M-Instruct"
REPORT_NAME = "worker"
TDX_REPORT_DATA_OFFSET = 568


@pytest.fixture(scope="module")
def firmware() -> FakeSnpFirmware:
    return FakeSnpFirmware()


class FakeTsmKernel:
    """The kernel's side of configfs-tsm, acted out in an ordinary directory."""

    def __init__(self, firmware: FakeSnpFirmware, provider: str = "sev_guest", auxblob: bytes | None = None) -> None:
        self.firmware = firmware
        self.provider = provider
        self.auxblob = firmware.certificate_table() if auxblob is None else auxblob
        self.generation = 0
        self.concurrent_writes = 0
        self.inblob_writes = 0
        self.outblob: bytes | None = None

    def populate(self, directory: Path) -> None:
        """Create the attribute files that mkdir creates in real configfs."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "provider").write_text(self.provider + "\n")
        (directory / "generation").write_text(f"{self.generation}\n")
        (directory / "inblob").write_bytes(b"")
        (directory / "outblob").write_bytes(b"")
        if self.provider == "sev_guest":
            (directory / "auxblob").write_bytes(self.auxblob)

    def after_write(self, directory: Path, name: str, data: bytes) -> None:
        assert name == "inblob", f"the backend wrote {name}"
        self.inblob_writes += 1
        self.generation += 1
        if self.concurrent_writes:
            # Another process writes its own inblob before our outblob is read.
            self.concurrent_writes -= 1
            self.generation += 1
        (directory / "generation").write_text(f"{self.generation}\n")
        (directory / "outblob").write_bytes(self.outblob if self.outblob is not None else self.make_report(data))

    def make_report(self, report_data: bytes) -> bytes:
        if self.provider == "sev_guest":
            return self.firmware.report(report_data)
        return b"TDX quote header".ljust(TDX_REPORT_DATA_OFFSET, b"\x00") + report_data + b"\x00" * 100


class KernelBackedTee(ConfigfsTsmTee):
    """ConfigfsTsmTee whose attribute writes also run the fake kernel's reaction."""

    def __init__(self, kernel: FakeTsmKernel, root: Path, platform: str = "sev-snp", **options: object) -> None:
        super().__init__(platform, configfs_root=root, report_name=REPORT_NAME, clock=lambda: NOW, **options)
        self.kernel = kernel

    def _write_attribute(self, name: str, data: bytes) -> None:
        super()._write_attribute(name, data)
        self.kernel.after_write(self.report_directory, name, data)


@pytest.fixture
def kernel(firmware, tmp_path) -> FakeTsmKernel:
    fake = FakeTsmKernel(firmware)
    fake.populate(tmp_path / REPORT_NAME)
    return fake


def attest(backend: ConfigfsTsmTee) -> HardwareDocument:
    return backend.attest(MEASUREMENT, "pool", POOL_KEY, MODEL, lifetime_s=600)


# -- SEV-SNP through configfs-tsm ------------------------------------------------------------


def test_attest_writes_binding_report_data(kernel, tmp_path):
    """attest() writes the 64-byte binding of its claims to inblob and returns the report."""
    backend = KernelBackedTee(kernel, tmp_path)

    document = attest(backend)

    expected = report_data_for("sev-snp", "pool", POOL_KEY, MEASUREMENT, MODEL, NOW, NOW + 600)
    assert (tmp_path / REPORT_NAME / "inblob").read_bytes() == expected
    assert document.report_data() == expected
    assert document.report[0x50:0x90] == expected
    assert document.report == (tmp_path / REPORT_NAME / "outblob").read_bytes()
    assert kernel.inblob_writes == 1


def test_attest_returns_claims_and_chain(kernel, firmware, tmp_path):
    """The document carries the claims, the provider and the VCEK, ASK and ARK from auxblob."""
    document = attest(KernelBackedTee(kernel, tmp_path))

    assert document.platform == "sev-snp"
    assert document.provider == "sev_guest"
    assert document.purpose == "pool"
    assert document.key == POOL_KEY
    assert document.measurement == MEASUREMENT
    assert document.model == MODEL
    assert document.issued_at == NOW
    assert document.expires_at == NOW + 600
    assert document.certificates == firmware.chain


def test_attested_document_verifies_end_to_end(kernel, firmware, tmp_path):
    """The document survives the wire and passes the client's SEV-SNP verifier."""
    snp = SnpTrustPolicy(ark=firmware.root.ark, launch_measurements=frozenset({LAUNCH_MEASUREMENT}), minimum_tcb=TcbVersion(0, 0, 0, 0))
    policy = TrustPolicy(platform_keys={}, measurements=frozenset({MEASUREMENT}), sev_snp=snp)
    wire = attest(KernelBackedTee(kernel, tmp_path)).to_wire()

    verified = verify_document(wire, policy, "pool", now=NOW + 30)

    assert verified.key == POOL_KEY


def test_wrong_provider_rejected(firmware, tmp_path):
    """A configfs-tsm provider other than the platform's fails before any write."""
    kernel = FakeTsmKernel(firmware, provider="tdx_guest")
    kernel.populate(tmp_path / REPORT_NAME)

    with pytest.raises(TeeError, match="provided by 'tdx_guest', expected 'sev_guest' for platform sev-snp"):
        attest(KernelBackedTee(kernel, tmp_path))
    assert kernel.inblob_writes == 0


def test_missing_configfs_rejected(tmp_path):
    """A missing configfs-tsm root fails with what to do instead."""
    backend = ConfigfsTsmTee("sev-snp", configfs_root=tmp_path / "absent")

    with pytest.raises(TeeError, match="not available at .*absent.*use the simulated TEE"):
        attest(backend)


def test_concurrent_writer_retried(kernel, tmp_path, caplog):
    """A concurrent write during one attempt is logged and the next attempt succeeds."""
    kernel.concurrent_writes = 1
    backend = KernelBackedTee(kernel, tmp_path)

    with caplog.at_level(logging.WARNING, logger="confide.worker.tee"):
        document = attest(backend)

    assert kernel.inblob_writes == 2
    assert document.report[0x50:0x90] == document.report_data()
    assert any("concurrent writer" in record.getMessage() for record in caplog.records)


def test_persistent_concurrent_writer_rejected(kernel, tmp_path):
    """A concurrent write during every attempt fails after max_attempts."""
    kernel.concurrent_writes = 10
    backend = KernelBackedTee(kernel, tmp_path, max_attempts=3)

    with pytest.raises(TeeError, match="during each of 3 attempts: give each process its own report name"):
        attest(backend)
    assert kernel.inblob_writes == 3


def test_report_without_our_report_data_rejected(kernel, firmware, tmp_path):
    """An outblob over other report data fails before a document is built."""
    kernel.outblob = firmware.report(bytes(64))

    with pytest.raises(TeeError, match="does not carry the report data written to inblob"):
        attest(KernelBackedTee(kernel, tmp_path))


def test_empty_or_oversized_outblob_rejected(kernel, tmp_path):
    """An empty outblob or one past the 32 KiB limit fails with its size."""
    kernel.outblob = b""
    with pytest.raises(TeeError, match="empty outblob"):
        attest(KernelBackedTee(kernel, tmp_path))

    kernel.outblob = bytes(32 * 1024 + 1)
    with pytest.raises(TeeError, match="32769 bytes exceeds the 32768-byte limit"):
        attest(KernelBackedTee(kernel, tmp_path))


def test_unreadable_generation_rejected(kernel, tmp_path):
    """A generation attribute that is not a number fails clearly."""
    (tmp_path / REPORT_NAME / "generation").write_text("many\n")

    with pytest.raises(TeeError, match="generation of .* is not an integer"):
        attest(KernelBackedTee(kernel, tmp_path))


def test_host_without_certificates_gives_empty_chain(firmware, tmp_path):
    """An empty auxblob gives a document without certificates, which clients then reject."""
    kernel = FakeTsmKernel(firmware, auxblob=b"")
    kernel.populate(tmp_path / REPORT_NAME)

    document = attest(KernelBackedTee(kernel, tmp_path))

    assert document.certificates == ()


def test_report_directory_created_and_removed(tmp_path):
    """close() removes a report instance the backend created and keeps one it reused."""
    backend = ConfigfsTsmTee("sev-snp", configfs_root=tmp_path, report_name="fresh")

    # Plain directories get no attribute files on mkdir, so the first read fails.
    with pytest.raises(TeeError, match="cannot read configfs-tsm attribute .*provider"):
        attest(backend)
    assert (tmp_path / "fresh").is_dir()
    backend.close()
    assert not (tmp_path / "fresh").exists()

    (tmp_path / "kept").mkdir()
    reused = ConfigfsTsmTee("sev-snp", configfs_root=tmp_path, report_name="kept")
    with pytest.raises(TeeError):
        attest(reused)
    reused.close()
    assert (tmp_path / "kept").is_dir()


def test_open_detects_platform_from_provider(firmware, tmp_path):
    """open() reads the provider attribute and returns a backend for its platform."""
    FakeTsmKernel(firmware, provider="sev_guest").populate(tmp_path / "snp")
    FakeTsmKernel(firmware, provider="tdx_guest").populate(tmp_path / "tdx")

    assert ConfigfsTsmTee.open(tmp_path, "snp").platform == "sev-snp"
    assert ConfigfsTsmTee.open(tmp_path, "tdx").platform == "tdx"


def test_open_failure_removes_created_report_directory(tmp_path):
    """A report instance that open() created is removed again when its provider cannot be read or is unknown."""
    with pytest.raises(TeeError, match="cannot read configfs-tsm attribute .*provider"):
        ConfigfsTsmTee.open(tmp_path, "fresh")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "provider").write_text("arm_cca_guest\n")

    with pytest.raises(TeeError, match="provided by 'arm_cca_guest', which confide does not know"):
        ConfigfsTsmTee.open(tmp_path, "odd")
    assert not (tmp_path / "fresh").exists()
    assert (tmp_path / "odd").is_dir(), "a report instance open() did not create is kept"


def test_default_report_name_is_per_process(tmp_path):
    """Without a name, each process uses its own report instance."""
    backend = ConfigfsTsmTee("tdx", configfs_root=tmp_path)

    assert backend.report_directory == tmp_path / f"confide-{os.getpid()}"
    assert backend.simulated is False
    assert backend.platform == "tdx"


def test_unknown_platform_rejected(tmp_path):
    """Only sev-snp and tdx have a configfs-tsm provider."""
    with pytest.raises(ValueError, match="platform must be one of"):
        ConfigfsTsmTee("simulated", configfs_root=tmp_path)
    with pytest.raises(ValueError, match="max_attempts"):
        ConfigfsTsmTee("tdx", configfs_root=tmp_path, max_attempts=0)


# -- TDX through configfs-tsm ------------------------------------------------------------------------


def test_tdx_quote_carried_without_certificates(firmware, tmp_path):
    """A TDX quote containing the report data becomes a document with no certificate chain."""
    kernel = FakeTsmKernel(firmware, provider="tdx_guest")
    kernel.populate(tmp_path / REPORT_NAME)

    document = attest(KernelBackedTee(kernel, tmp_path, platform="tdx"))

    assert document.platform == "tdx"
    assert document.provider == "tdx_guest"
    assert document.certificates == ()
    assert document.report[TDX_REPORT_DATA_OFFSET : TDX_REPORT_DATA_OFFSET + 64] == document.report_data()


def test_tdx_quote_without_report_data_rejected(firmware, tmp_path):
    """A TDX quote that does not contain the written report data fails."""
    kernel = FakeTsmKernel(firmware, provider="tdx_guest")
    kernel.populate(tmp_path / REPORT_NAME)
    kernel.outblob = b"quote over something else" + bytes(600)

    with pytest.raises(TeeError, match="does not contain the report data"):
        attest(KernelBackedTee(kernel, tmp_path, platform="tdx"))


# -- the certificate table ---------------------------------------------------------------------------------


def test_certificate_table_parsed_in_chain_order(firmware):
    """Entries in any order come back as VCEK, ASK, ARK; unknown GUIDs are skipped."""
    vlek_guid = bytes.fromhex("a8074bc2a25a483eaae639c045a0b8a1")
    table = certificate_table([(ARK_GUID, firmware.root.ark), (vlek_guid, b"vlek"), (VCEK_GUID, firmware.vcek), (ASK_GUID, firmware.root.ask)])

    assert parse_certificate_table(table) == firmware.chain


def test_certificate_table_without_ark(firmware):
    """A table with only VCEK and ASK gives a two-certificate chain."""
    table = certificate_table([(VCEK_GUID, firmware.vcek), (ASK_GUID, firmware.root.ask)])

    assert parse_certificate_table(table) == firmware.chain[:2]


def test_certificate_table_without_vcek_gives_nothing(firmware, caplog):
    """A table without a VCEK gives no chain and logs why."""
    table = certificate_table([(ASK_GUID, firmware.root.ask), (ARK_GUID, firmware.root.ark)])

    with caplog.at_level(logging.WARNING, logger="confide.worker.tee"):
        assert parse_certificate_table(table) == ()
    assert any("no VCEK or no ASK" in record.getMessage() for record in caplog.records)


def test_certificate_table_malformed_rejected(firmware):
    """A missing zero entry, a duplicate, an entry out of bounds or into the header all fail."""
    good = certificate_table([(VCEK_GUID, firmware.vcek), (ASK_GUID, firmware.root.ask)])
    duplicate = certificate_table([(VCEK_GUID, firmware.vcek), (VCEK_GUID, firmware.vcek)])
    out_of_bounds = VCEK_GUID + struct.pack("<II", 48, 10_000) + bytes(24) + b"x" * 10
    into_header = VCEK_GUID + struct.pack("<II", 0, 24) + bytes(24)
    empty_entry = VCEK_GUID + struct.pack("<II", 48, 0) + bytes(24)
    endless = (bytes(range(1, 17)) + struct.pack("<II", 0, 0)) * 65

    cases = {
        "without its zero entry": good[:40],
        "lists the VCEK twice": duplicate,
        "lies outside the certificate data": out_of_bounds,
        "offset 0, length 24": into_header,
        "length 0": empty_entry,
        "more than 64 entries": endless,
    }
    for message, table in cases.items():
        with pytest.raises(TeeError, match=message):
            parse_certificate_table(table)


# -- the hardware document on the wire --------------------------------------------------------------------


def make_document(**overrides: object) -> HardwareDocument:
    fields = {
        "platform": "sev-snp",
        "purpose": "pool",
        "key": POOL_KEY,
        "measurement": MEASUREMENT,
        "model": MODEL,
        "issued_at": NOW,
        "expires_at": NOW + 600,
        "report": b"r" * 1184,
        "certificates": (b"vcek", b"ask"),
    }
    fields.update(overrides)
    return HardwareDocument(**fields)


def test_document_wire_round_trip():
    """A hardware document decodes back to itself and its repr shows no key or report bytes."""
    document = make_document()

    assert HardwareDocument.from_wire(document.to_wire()) == document
    assert POOL_KEY.hex() not in repr(document)
    assert "report=[1184 bytes]" in repr(document)


def test_report_data_binds_every_claim():
    """Changing any one claim changes the 64-byte report data."""
    base = make_document()
    changes = {"platform": "tdx", "purpose": "join", "key": bytes(32), "measurement": bytes(32), "model": "m", "issued_at": 1, "expires_at": 2}

    assert len(base.report_data()) == 64
    for name, value in changes.items():
        assert make_document(**{name: value}).report_data() != base.report_data(), name


def test_document_malformed_rejected():
    """Wrong provider, key id, platform, field sizes or certificate types fail to decode."""
    fields = decode(make_document().to_wire(), 1 << 20)
    cases = {
        "provider": "tdx_guest",
        "key_id": bytes(8),
        "platform": "simulated",
        "key": bytes(31),
        "measurement": bytes(48),
        "report": b"",
        "certs": [b"a", b"b", b"c", b"d"],
        "purpose": "other",
    }

    for name, value in cases.items():
        with pytest.raises(DecodeError):
            HardwareDocument.from_wire(encode({**fields, name: value}))
    with pytest.raises(DecodeError, match=r"certs\[1\] must be binary"):
        HardwareDocument.from_wire(encode({**fields, "certs": [b"a", "text"]}))
    with pytest.raises(DecodeError, match="unsupported_version"):
        HardwareDocument.from_wire(encode({**fields, "v": 2}))
