"""configfs-tsm's kernel side, acted out for a worker running in another process.

There is no SEV-SNP guest here. In a real guest, writing a report
instance's inblob makes the kernel ask the secure processor for a report,
which outblob then returns. FifoTsmKernel gives a worker process the same
sequence through named pipes: inblob and outblob are FIFOs. A thread in the
test process reads each inblob write and bumps generation. It then writes a
report that tests/sev_snp_fakes.py signs over the written report data.
provider, generation and auxblob are ordinary files, as the backend only
reads them. The worker's code path is the one it runs on hardware; only the
other end of the files is fake.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from sev_snp_fakes import FakeSnpFirmware

REPORT_DATA_SIZE = 64


class FifoTsmKernel:
    """Serve one configfs-tsm report instance at `root/name` until stopped."""

    def __init__(self, firmware: FakeSnpFirmware, root: Path, name: str, provider: str = "sev_guest") -> None:
        self.firmware = firmware
        self.directory = root / name
        self.provider = provider
        self.generation = 0
        self.reports = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fake-tsm-{name}", daemon=True)

    def __enter__(self) -> FifoTsmKernel:
        self.directory.mkdir(parents=True)
        (self.directory / "provider").write_text(self.provider + "\n")
        self._write_generation()
        (self.directory / "auxblob").write_bytes(self.firmware.certificate_table())
        os.mkfifo(self.directory / "inblob", 0o600)
        os.mkfifo(self.directory / "outblob", 0o600)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        # Wake the thread wherever it blocks: in opening inblob for a read,
        # or in opening outblob for a write whose reader went away.
        for name, flags in (("inblob", os.O_WRONLY), ("outblob", os.O_RDONLY)):
            try:
                descriptor = os.open(self.directory / name, flags | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # no process waits on this end
                    raise
                continue
            os.close(descriptor)
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._stopped.is_set():
            with open(self.directory / "inblob", "rb") as inblob:
                report_data = inblob.read()
            if self._stopped.is_set():
                return
            # The kernel zero-pads report data shorter than 64 bytes.
            report = self.firmware.report(report_data[:REPORT_DATA_SIZE].ljust(REPORT_DATA_SIZE, b"\x00"))
            self.generation += 1
            self._write_generation()
            with open(self.directory / "outblob", "wb") as outblob:
                if self._stopped.is_set():
                    return
                outblob.write(report)
            self.reports += 1

    def _write_generation(self) -> None:
        temporary = self.directory / ".generation"
        temporary.write_text(f"{self.generation}\n")
        os.replace(temporary, self.directory / "generation")
