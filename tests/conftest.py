"""Shared fixtures: a real nats-server on a free loopback port and a real worker process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from confide import stack
from confide.clients.client import Client
from confide.clients.trust import save_trust
from confide.release import append_release, load_or_create_log_key, publish_release_log
from confide.schemas import crypto
from confide.schemas.attestation import TrustPolicy
from confide.workers.engine import DEFAULT_N_CTX, EngineSettings, default_model_path
from confide.workers.measurement import measure
from confide.workers.tee import create_platform_key

PROMPTS_FILE = Path(__file__).parent / "prompts.jsonl"
CANARY = "CANARY-7f3a9c1e-confide-leak-check"


def load_prompts() -> dict[str, dict]:
    with PROMPTS_FILE.open(encoding="utf-8") as handle:
        return {row["id"]: row for row in map(json.loads, handle)}


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def prompts() -> dict[str, dict]:
    return load_prompts()


@dataclass
class Broker:
    url: str
    port: int
    process: subprocess.Popen
    directory: Path
    log_path: Path

    def output(self) -> bytes:
        return self.log_path.read_bytes()


def start_broker(directory: Path, port: int | None = None) -> Broker:
    directory.mkdir(parents=True, exist_ok=True)
    port = port or stack.free_port()
    state = stack.StackState(directory)
    process, url = stack.start_broker(state, stack.HOST, port)
    stack.wait_for_port(stack.HOST, port, 15, process)
    return Broker(url, port, process, directory, directory / "broker.log")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Broker:
    server = start_broker(tmp_path_factory.mktemp("broker"))
    yield server
    stop(server.process)


@dataclass
class Pool:
    """The simulated platform root, the release log and the trust policy clients pin."""

    platform_key_path: Path
    platform_verify_key: bytes
    measurement: bytes
    policy: TrustPolicy
    trust_path: Path
    release_log: Path
    log_key: crypto.SigningKey

    def publish_log(self, url: str) -> None:
        """Publish the release log to a broker, as its operator would before workers start."""
        # Run in a thread with its own event loop: callers may be inside one already.
        with ThreadPoolExecutor(1) as executor:
            executor.submit(asyncio.run, publish_release_log(url, self.release_log, self.log_key)).result(timeout=30)


@pytest.fixture(scope="session")
def pool(tmp_path_factory) -> Pool:
    directory = tmp_path_factory.mktemp("pool")
    key_path = directory / "platform.key"
    platform_key = create_platform_key(key_path)
    measurement = measure(default_model_path(), EngineSettings(default_model_path(), DEFAULT_N_CTX).measured())
    log_key = load_or_create_log_key(directory / "log.key")
    append_release(directory / "release-log.sqlite3", measurement)
    policy = stack.local_trust_policy(platform_key.verify_key, measurement, log_key.verify_key)
    save_trust(directory / "trust.json", policy)
    return Pool(key_path, platform_key.verify_key, measurement, policy, directory / "trust.json", directory / "release-log.sqlite3", log_key)


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    log_path: Path
    stats_path: Path

    def output(self) -> bytes:
        return self.log_path.read_bytes()

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())


def start_worker(
    url: str,
    pool: Pool,
    directory: Path,
    name: str = "worker",
    extra: list[str] | None = None,
    verbose: bool = False,
    trust: Path | None = None,
    simulated: bool = True,
) -> WorkerProcess:
    """Start `confide worker` and wait until it takes jobs; `verbose` adds its debug lines to the log.

    `trust` replaces the pool's trust policy; `simulated=False` leaves out the
    simulated platform key, for a worker that `extra` gives another TEE backend.
    """
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{name}.log"
    stats_path = directory / f"{name}.stats.json"
    stats_path.unlink(missing_ok=True)
    pool.publish_log(url)
    command = [
        sys.executable, "-m", "confide.cli", *(["--verbose"] if verbose else []), "worker",
        "--broker", url,
        *(["--platform-key", str(pool.platform_key_path)] if simulated else []),
        "--trust", str(trust or pool.trust_path),
        "--stats-file", str(stats_path),
        "--threads", "2",
        *(extra or []),
    ]
    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not stats_path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            stop(process)
            raise TimeoutError(f"worker not ready:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    return WorkerProcess(process, log_path, stats_path)


@pytest.fixture(scope="session")
def worker(broker: Broker, pool: Pool, tmp_path_factory) -> WorkerProcess:
    process = start_worker(broker.url, pool, tmp_path_factory.mktemp("worker"))
    yield process
    stop(process.process)


@pytest.fixture
async def client(broker: Broker, pool: Pool, worker: WorkerProcess) -> Client:
    async with await Client.connect(broker.url, pool.policy, reply_timeout_s=60) as connected:
        yield connected


@pytest.fixture(scope="session")
def local_engine():
    """The same model and settings as the worker, in this process, for direct comparisons."""
    from confide.workers.engine import Engine

    return Engine(EngineSettings(default_model_path(), DEFAULT_N_CTX, n_threads=2))
