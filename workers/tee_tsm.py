"""A TEE backend over Linux's configfs-tsm report interface, for SEV-SNP and TDX guests.

NOTE: no SEV-SNP or TDX hardware was available when this was written. The
backend has run only against a fake configfs tree that the tests build
(tests/tsm_fakes.py), never in a real confidential VM. `confide worker
--tee configfs-tsm` selects it.

The kernel ABI (Documentation/ABI/testing/configfs-tsm-report, Linux 6.7
and later), under /sys/kernel/config/tsm/report:

- mkdir $name creates a report instance with the attributes below;
- inblob (write-only) takes up to 64 bytes of report data;
- outblob (read-only) returns the platform's signed report over them, in
  the format that provider names ("sev_guest" or "tdx_guest");
- auxblob (read-only, "sev_guest" only) returns the host's certificate
  table (GUID, offset, length entries, a zero entry, then DER certificates);
- generation (read-only) counts writes, so a reader can detect that
  another process wrote between its own write and read.

attest() writes report data that binds the document's claims (see
schemas/hardware.py), reads the report back and returns a HardwareDocument.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confide.errors import TeeError
from confide.schemas.hardware import MAX_REPORT, PROVIDERS, REPORT_DATA_SIZE, HardwareDocument, report_data_for
from confide.workers.tee import TeeBackend

log = logging.getLogger("confide.worker.tee")

DEFAULT_CONFIGFS_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_MAX_ATTEMPTS = 3

# An SEV-SNP report carries the report data at offset 0x50 (AMD's SEV-SNP firmware ABI).
SNP_REPORT_DATA_OFFSET = 0x50

# GHCB certificate table entries: a 16-byte GUID (RFC 4122 byte order, as
# AMD's tools and go-sev-guest write it) and two little-endian u32s.
CERTIFICATE_TABLE_ENTRY = struct.Struct("<16sII")
MAX_CERTIFICATE_TABLE_ENTRIES = 64
CERTIFICATE_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes: "vcek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes: "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes: "ark",
}


class ConfigfsTsmTee(TeeBackend):
    """Attestation through configfs-tsm: the CPU signs a report over confide's report data.

    `configfs_root` is the report directory (the kernel's is the default);
    tests pass a directory tree they build. One report instance, named
    `report_name` (default "confide-<pid>"), serves every call of this
    object, and a lock serialises the calls.
    """

    simulated = False

    def __init__(
        self,
        platform: str,
        configfs_root: Path = DEFAULT_CONFIGFS_ROOT,
        report_name: str | None = None,
        clock: Callable[[], float] = time.time,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if platform not in PROVIDERS:
            raise ValueError(f"platform must be one of {sorted(PROVIDERS)}, got {platform!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")

        self.platform = platform
        self.provider = PROVIDERS[platform]
        self.configfs_root = configfs_root
        self.report_directory = configfs_root / (report_name or f"confide-{os.getpid()}")
        self._clock = clock
        self._max_attempts = max_attempts
        self._lock = threading.Lock()
        self._created_directory = False

    @classmethod
    def open(cls, configfs_root: Path = DEFAULT_CONFIGFS_ROOT, report_name: str | None = None) -> ConfigfsTsmTee:
        """Create the report instance and return a backend for the platform its provider names.

        Raises TeeError when configfs-tsm is missing or its provider is unknown.
        """
        probe = cls("sev-snp", configfs_root, report_name)
        probe._open_report_directory()
        try:
            provider = probe._read_attribute("provider").decode("ascii", "replace").strip()
            platforms = {name: platform for platform, name in PROVIDERS.items()}
            if provider not in platforms:
                raise TeeError(f"configfs-tsm at {configfs_root} is provided by '{provider}', which confide does not know")
        except TeeError:
            try:
                probe.close()  # leave no report instance behind
            except TeeError as exc:
                log.warning("%s", exc)
            raise
        backend = cls(platforms[provider], configfs_root, report_name)
        backend._created_directory = probe._created_directory
        return backend

    def attest(
        self, measurement: bytes, purpose: str, key: bytes, model: str, lifetime_s: int, dev_mode: bool = False
    ) -> HardwareDocument:
        """Ask the CPU for a report that binds `key` and the other claims, and return the document.

        Raises TeeError when configfs-tsm is missing, names another provider,
        keeps changing under a concurrent writer, or returns an unusable report.
        """
        issued_at = int(self._clock())
        expires_at = issued_at + lifetime_s
        report_data = report_data_for(self.platform, purpose, key, measurement, model, issued_at, expires_at, dev_mode)

        with self._lock:
            report, auxblob = self._request_report(report_data)

        certificates = parse_certificate_table(auxblob) if self.platform == "sev-snp" else ()
        return HardwareDocument(
            platform=self.platform,
            purpose=purpose,
            key=key,
            measurement=measurement,
            model=model,
            issued_at=issued_at,
            expires_at=expires_at,
            report=report,
            certificates=certificates,
            dev_mode=dev_mode,
        )

    def close(self) -> None:
        """Remove the report instance if this object created it."""
        if not self._created_directory:
            return

        try:
            os.rmdir(self.report_directory)
        except OSError as exc:
            raise TeeError(f"cannot remove the configfs-tsm report {self.report_directory}: {exc.strerror}") from None
        self._created_directory = False

    def _request_report(self, report_data: bytes) -> tuple[bytes, bytes]:
        self._open_report_directory()
        provider = self._read_attribute("provider").decode("ascii", "replace").strip()
        if provider != self.provider:
            raise TeeError(
                f"configfs-tsm at {self.configfs_root} is provided by '{provider}', "
                f"expected '{self.provider}' for platform {self.platform}"
            )

        for attempt in range(1, self._max_attempts + 1):
            before = self._read_generation()
            self._write_attribute("inblob", report_data)
            report = self._read_attribute("outblob")
            auxblob = self._read_attribute("auxblob") if (self.report_directory / "auxblob").exists() else b""
            after = self._read_generation()
            if after == before + 1:
                break
            # Another process wrote to this report instance between our write
            # and our read, so the report may be over its data, not ours.
            log.warning(
                "configfs-tsm report %s changed under a concurrent writer (generation %d to %d), attempt %d of %d",
                self.report_directory.name, before, after, attempt, self._max_attempts,
            )
        else:
            raise TeeError(
                f"the configfs-tsm report {self.report_directory} was written by another process during each of "
                f"{self._max_attempts} attempts: give each process its own report name"
            )

        self._check_report(report, report_data)
        return report, auxblob

    def _open_report_directory(self) -> None:
        if not self.configfs_root.is_dir():
            raise TeeError(
                f"configfs-tsm is not available at {self.configfs_root}: this machine is not an SEV-SNP or TDX guest, "
                "configfs is not mounted, or the kernel is older than 6.7; use the simulated TEE instead"
            )
        if self.report_directory.is_dir():
            return

        try:
            self.report_directory.mkdir()
        except OSError as exc:
            raise TeeError(f"cannot create the configfs-tsm report {self.report_directory}: {exc.strerror}") from None
        self._created_directory = True

    def _read_generation(self) -> int:
        text = self._read_attribute("generation").decode("ascii", "replace").strip()
        try:
            return int(text)
        except ValueError:
            raise TeeError(f"configfs-tsm generation of {self.report_directory} is not an integer") from None

    def _read_attribute(self, name: str) -> bytes:
        path = self.report_directory / name
        try:
            return path.read_bytes()
        except OSError as exc:
            # EFBIG means the report outgrew the kernel's outblob limit (see the ABI document).
            raise TeeError(f"cannot read configfs-tsm attribute {path}: {exc.strerror}") from None

    def _write_attribute(self, name: str, data: bytes) -> None:
        """Write one attribute in a single write() and close it: configfs applies the value on close."""
        path = self.report_directory / name
        try:
            descriptor = os.open(path, os.O_WRONLY)
            try:
                written = os.write(descriptor, data)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise TeeError(f"cannot write configfs-tsm attribute {path}: {exc.strerror}") from None
        if written != len(data):
            raise TeeError(f"configfs-tsm attribute {path} took {written} of {len(data)} bytes")

    def _check_report(self, report: bytes, report_data: bytes) -> None:
        """Check that the report is usable and carries our report data, before anyone relies on it."""
        if not report:
            raise TeeError(f"configfs-tsm report {self.report_directory} returned an empty outblob")
        if len(report) > MAX_REPORT:
            raise TeeError(f"configfs-tsm report of {len(report)} bytes exceeds the {MAX_REPORT}-byte limit of a document")

        if self.platform == "sev-snp":
            carried = report[SNP_REPORT_DATA_OFFSET : SNP_REPORT_DATA_OFFSET + REPORT_DATA_SIZE]
            if carried != report_data:
                raise TeeError("the SEV-SNP report does not carry the report data written to inblob")
        # NOTE: for TDX only the presence of the report data is checked, not its
        # offset in the quote, because the quote layout is not parsed here.
        elif report_data not in report:
            raise TeeError("the TDX quote does not contain the report data written to inblob")


def parse_certificate_table(auxblob: bytes) -> tuple[bytes, ...]:
    """Return (VCEK, ASK) or (VCEK, ASK, ARK) from an SEV-SNP certificate table, or () when it has none.

    An empty auxblob means the host supplies no certificates, which a
    verifier then rejects. Unknown GUIDs (such as a VLEK or a CRL) are skipped.
    Raises TeeError when the table is malformed.
    """
    if not auxblob:
        return ()

    entries: dict[str, tuple[int, int]] = {}
    for position in range(MAX_CERTIFICATE_TABLE_ENTRIES):
        start = position * CERTIFICATE_TABLE_ENTRY.size
        if start + CERTIFICATE_TABLE_ENTRY.size > len(auxblob):
            raise TeeError(f"the SEV-SNP certificate table ends after {position} entries without its zero entry")
        guid, offset, length = CERTIFICATE_TABLE_ENTRY.unpack_from(auxblob, start)
        if guid == bytes(16) and offset == 0 and length == 0:
            header_size = start + CERTIFICATE_TABLE_ENTRY.size
            break
        name = CERTIFICATE_GUIDS.get(guid)
        if name is None:
            continue
        if name in entries:
            raise TeeError(f"the SEV-SNP certificate table lists the {name.upper()} twice")
        entries[name] = (offset, length)
    else:
        raise TeeError(f"the SEV-SNP certificate table has more than {MAX_CERTIFICATE_TABLE_ENTRIES} entries")

    for name, (offset, length) in entries.items():
        if length == 0 or offset < header_size or offset + length > len(auxblob):
            raise TeeError(
                f"the SEV-SNP certificate table's {name.upper()} entry (offset {offset}, length {length}) "
                f"lies outside the certificate data, bytes {header_size} to {len(auxblob)}"
            )
    if "vcek" not in entries or "ask" not in entries:
        log.warning("the host supplied no VCEK or no ASK certificate, so clients cannot verify this report")
        return ()

    certificates = []
    for name in ("vcek", "ask", "ark"):
        if name in entries:
            offset, length = entries[name]
            certificates.append(auxblob[offset : offset + length])
    return tuple(certificates)
