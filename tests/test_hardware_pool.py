"""A worker pool on the configfs-tsm backend, with clients verifying SEV-SNP reports.

No SEV-SNP guest is available here. Each worker is a real `confide worker
--tee configfs-tsm` process with a real broker and model. tests/tsm_fakes.py
serves its report instance, and the test AMD root of tests/sev_snp_fakes.py,
which the trust policy pins, signs the reports. The
worker, pool and client code is the code that would run in a guest.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from sev_snp_fakes import LAUNCH_MEASUREMENT, TCB, FakeSnpFirmware
from tsm_fakes import FifoTsmKernel

from conftest import start_broker, start_worker, stop
from confide.clients.client import Client
from confide.clients.trust import load_trust, save_trust
from confide.errors import AttestationError
from confide.schemas.messages import ChatMessage, GenerationParams
from confide.schemas.sev_snp import SnpTrustPolicy

pytestmark = pytest.mark.anyio

QUICK = GenerationParams(max_tokens=24, temperature=0.0)
CONFIDE = str(Path(sys.executable).parent / "confide")
OTHER_LAUNCH_MEASUREMENT = bytes(range(100, 148))


@pytest.fixture(scope="module")
def firmware() -> FakeSnpFirmware:
    return FakeSnpFirmware()


@pytest.fixture
def snp_trust(pool, firmware, tmp_path) -> Path:
    """The session's trust policy plus the pinned test AMD root and the guest's launch measurement."""
    path = tmp_path / "trust-snp.json"
    snp = SnpTrustPolicy(ark=firmware.root.ark, launch_measurements=frozenset({LAUNCH_MEASUREMENT}), minimum_tcb=TCB)
    save_trust(path, replace(load_trust(pool.trust_path), sev_snp=snp))
    return path


@pytest.fixture
def running():
    """Collect the processes and fake kernels a test starts and stop them when it ends, pass or fail."""
    processes: list[subprocess.Popen] = []
    kernels: list[FifoTsmKernel] = []
    yield processes, kernels
    for process in reversed(processes):
        stop(process)
    for kernel in kernels:
        kernel.__exit__(None, None, None)


def hardware_worker(url, pool, tmp_path, name, kernels, firmware, trust: Path, provider: str = "sev_guest", extra=()):
    """Serve a report instance for `name` and start a configfs-tsm worker on it."""
    configfs = tmp_path / "configfs"
    kernels.append(FifoTsmKernel(firmware, configfs, name, provider).__enter__())
    arguments = ["--tee", "configfs-tsm", "--configfs-root", str(configfs), "--tsm-report-name", name, *extra]
    return start_worker(url, pool, tmp_path, name, extra=arguments, trust=trust, simulated=False)


async def test_hardware_pool_serves_verified_job(pool, firmware, snp_trust, tmp_path, running, prompts, local_engine):
    """A client verifies the SEV-SNP pool document and gets the model's exact greedy reply to a Hindi prompt."""
    processes, kernels = running
    broker = start_broker(tmp_path / "broker")
    processes.append(broker.process)
    worker = hardware_worker(broker.url, pool, tmp_path, "snp-worker", kernels, firmware, snp_trust)
    processes.append(worker.process)
    messages = [ChatMessage("user", prompts["p21"]["prompt"])]
    pieces: list[str] = []
    local_engine.generate(local_engine.prompt_tokens(messages), QUICK, pieces.append, threading.Event())

    async with await Client.connect(broker.url, load_trust(snp_trust), reply_timeout_s=120) as client:
        body = await client.attest()
        reply = await client.ask_text(messages, QUICK)

    assert (body.platform, body.simulated, body.purpose) == ("sev-snp", False, "pool")
    assert reply.encode("utf-8") == "".join(pieces).encode("utf-8")
    # One report for the worker's start check, one for the pool document at least.
    assert kernels[0].reports >= 2
    output = worker.output().decode(errors="replace")
    assert "SEV-SNP report verified" in output
    assert "SIMULATED" not in output


async def test_hardware_pool_refused_without_pinned_root(pool, firmware, snp_trust, tmp_path, running):
    """A device whose trust policy pins no AMD root refuses the SEV-SNP pool and names why."""
    processes, kernels = running
    broker = start_broker(tmp_path / "broker")
    processes.append(broker.process)
    processes.append(hardware_worker(broker.url, pool, tmp_path, "snp-worker", kernels, firmware, snp_trust).process)

    async with await Client.connect(broker.url, pool.policy, reply_timeout_s=60) as client:
        with pytest.raises(AttestationError, match="pins no AMD root"):
            await client.attest()


def test_cli_verify_prints_sev_snp_steps(pool, firmware, snp_trust, tmp_path, running):
    """`confide verify` walks the SEV-SNP chain in plain words, from the pinned ARK to the pool key."""
    processes, kernels = running
    broker = start_broker(tmp_path / "broker")
    processes.append(broker.process)
    processes.append(hardware_worker(broker.url, pool, tmp_path, "snp-worker", kernels, firmware, snp_trust).process)

    result = subprocess.run(
        [CONFIDE, "verify", "--broker", broker.url, "--trust", str(snp_trust)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"trust policy .*platforms \['simulated', 'sev-snp'\]", result.stdout)
    assert re.search(r"signature .*SEV-SNP report signed by a VCEK that chains to the pinned ARK", result.stdout)
    assert re.search(r"platform .*hardware TEE: SEV-SNP, launch measurement " + LAUNCH_MEASUREMENT.hex()[:16], result.stdout)
    assert re.search(r"release log .*signed by the pinned log key", result.stdout)


async def test_hardware_joiner_other_image_refused(pool, firmware, snp_trust, tmp_path, running):
    """A second guest on the same image joins; a guest with another launch measurement is refused by the member."""
    processes, kernels = running
    broker = start_broker(tmp_path / "broker")
    processes.append(broker.process)
    member = hardware_worker(broker.url, pool, tmp_path, "member", kernels, firmware, snp_trust)
    processes.append(member.process)

    joiner = hardware_worker(broker.url, pool, tmp_path, "joiner", kernels, firmware, snp_trust)
    processes.append(joiner.process)
    assert b"pool key joined from a pool member" in joiner.output()

    # The stranger runs another guest image. Its own trust policy lists that
    # image, so it passes its start check, and the member is what refuses it.
    stranger_firmware = FakeSnpFirmware(root=firmware.root, measurement=OTHER_LAUNCH_MEASUREMENT)
    stranger_trust = tmp_path / "trust-stranger.json"
    policy = load_trust(snp_trust)
    save_trust(stranger_trust, replace(policy, sev_snp=replace(policy.sev_snp, launch_measurements=frozenset({OTHER_LAUNCH_MEASUREMENT}))))
    with pytest.raises(RuntimeError, match="worker exited with 1"):
        hardware_worker(broker.url, pool, tmp_path, "stranger", kernels, stranger_firmware, stranger_trust)
    stranger_output = (tmp_path / "stranger.log").read_text(errors="replace")

    assert "confide: a pool member rejected the key release request" in stranger_output
    assert "Traceback" not in stranger_output
    refusals = [line for line in (member.output() + joiner.output()).decode().splitlines() if "key release refused" in line]
    assert len(refusals) == 1
    assert re.search(
        r"key release refused: rejected a joining worker: launch measurement [0-9a-f]{16}\.\.\. is not in the allowed set$", refusals[0]
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_pinned_root", "the trust policy has no sev_snp section"),
        ("tdx_guest", "confide cannot verify yet"),
        ("unlisted_launch_measurement", "is not in the trust policy's sev_snp launch_measurements"),
        ("no_configfs", "configfs-tsm is not available at"),
    ],
)
def test_hardware_worker_refuses_to_start(pool, firmware, snp_trust, tmp_path, running, case, message):
    """A configfs-tsm worker that clients could not trust stops at start with one clear line."""
    processes, kernels = running
    broker = start_broker(tmp_path / "broker")
    processes.append(broker.process)
    trust, provider, guest = snp_trust, "sev_guest", firmware
    if case == "no_pinned_root":
        trust = pool.trust_path
    elif case == "tdx_guest":
        provider = "tdx_guest"
    elif case == "unlisted_launch_measurement":
        guest = FakeSnpFirmware(root=firmware.root, measurement=OTHER_LAUNCH_MEASUREMENT)
    extra = ("--configfs-root", str(tmp_path / "missing")) if case == "no_configfs" else ()

    with pytest.raises(RuntimeError, match="worker exited with 1") as failure:
        hardware_worker(broker.url, pool, tmp_path, "worker", kernels, guest, trust, provider, extra)

    lines = [line for line in str(failure.value).splitlines() if line.startswith("confide: ")]
    assert len(lines) == 1, str(failure.value)
    assert message in lines[0]
    assert "Traceback" not in str(failure.value)


def test_trust_pin_sev_snp_writes_the_policy(pool, firmware, tmp_path):
    """`confide trust pin-sev-snp` pins a PEM ARK, launch measurements and a TCB, and rejects bad input clearly."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    trust = tmp_path / "trust.json"
    trust.write_text(pool.trust_path.read_text())
    ark = tmp_path / "ark.pem"
    ark.write_bytes(x509.load_der_x509_certificate(firmware.root.ark).public_bytes(Encoding.PEM))
    command = [CONFIDE, "trust", "pin-sev-snp", "--trust", str(trust), "--ark", str(ark)]

    pinned = subprocess.run(
        [*command, "--launch-measurement", LAUNCH_MEASUREMENT.hex(), "--minimum-tcb", "3,0,8,115"], capture_output=True, text=True
    )
    short = subprocess.run([*command, "--launch-measurement", "abcd", "--minimum-tcb", "3,0,8,115"], capture_output=True, text=True)
    bad_tcb = subprocess.run([*command, "--launch-measurement", LAUNCH_MEASUREMENT.hex(), "--minimum-tcb", "3,0,8"], capture_output=True, text=True)

    assert pinned.returncode == 0, pinned.stderr
    policy = load_trust(trust)
    assert policy.sev_snp.ark == firmware.root.ark
    assert policy.sev_snp.launch_measurements == frozenset({LAUNCH_MEASUREMENT})
    assert policy.sev_snp.minimum_tcb == TCB
    assert policy.log_key == pool.policy.log_key, "pinning must keep the rest of the policy"
    assert json.loads(trust.read_text())["sev_snp"]["allow_debug"] is False
    assert short.returncode != 0
    assert "a launch measurement is 48 bytes" in short.stderr
    assert bad_tcb.returncode != 0
    assert "--minimum-tcb must be four numbers" in bad_tcb.stderr


def test_trust_pin_sev_snp_chain_file(pool, firmware, tmp_path):
    """Given AMD's chain file (ASK, then ARK) the ARK is pinned; the ASK alone is refused; a new file is created."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    def pem(der: bytes) -> bytes:
        return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)

    chain = tmp_path / "cert_chain.pem"
    chain.write_bytes(pem(firmware.root.ask) + pem(firmware.root.ark))
    ask = tmp_path / "ask.pem"
    ask.write_bytes(pem(firmware.root.ask))
    trust = tmp_path / "new" / "trust.json"
    tail = ["--launch-measurement", "0x" + LAUNCH_MEASUREMENT.hex().upper(), "--minimum-tcb", "3,0,8,115"]

    from_chain = subprocess.run([CONFIDE, "trust", "pin-sev-snp", "--trust", str(trust), "--ark", str(chain), *tail], capture_output=True, text=True)
    from_ask = subprocess.run([CONFIDE, "trust", "pin-sev-snp", "--trust", str(trust), "--ark", str(ask), *tail], capture_output=True, text=True)
    log_key = subprocess.run([CONFIDE, "trust", "pin-log-key", "--trust", str(trust), pool.policy.log_key.hex()], capture_output=True, text=True)

    assert from_chain.returncode == 0, from_chain.stderr
    assert "no release log key is pinned" in from_chain.stderr
    assert from_ask.returncode != 0
    assert "holds no self-signed certificate" in from_ask.stderr
    assert log_key.returncode == 0, log_key.stderr
    policy = load_trust(trust)
    assert policy.sev_snp.ark == firmware.root.ark
    assert policy.sev_snp.launch_measurements == frozenset({LAUNCH_MEASUREMENT})
    assert policy.log_key == pool.policy.log_key
    assert policy.platform_keys == {}
