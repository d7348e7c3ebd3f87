"""Brokers with authentication, relays, TLS material and a source-address forwarder, for the access tests.

Everything listens on loopback only. The forwarder lets a client connect
"from" another loopback address (127.0.0.7): nats-py cannot bind its source
address, so the test connects to the forwarder, which opens its own
connection to the target from that address and copies bytes both ways.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nats
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Pool, WorkerProcess, stop
from confide import stack
from confide.broker_config import ServerTls, render_relay_config
from confide.broker_config.credentials import Authority, ClientCredential, LocalCredentials, load_client_credential, load_user_credentials, tls_context
from confide.broker_config.permissions import OPERATOR_INBOX_PREFIX, RELEASE_INBOX_PREFIX, WORKER_INBOX_PREFIX
from confide.schemas.release_log import ReleaseLog
from confide.schemas.release_feed import publish_log

CLIENT_SOURCE_ADDRESS = "127.0.0.7"
RELAY_NAME = "edge"


@dataclass
class SecureBroker:
    url: str
    port: int
    process: subprocess.Popen
    directory: Path
    credentials: LocalCredentials
    authority: Authority
    tls_ca: Path | None = None
    leafnode_port: int | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "broker.log"

    @property
    def store(self) -> Path:
        return self.directory / "jetstream"

    def output(self) -> bytes:
        return self.log_path.read_bytes()

    def client_credential(self):
        return load_client_credential(self.credentials.client)

    async def connect_as(self, role: str, url: str | None = None, **options) -> nats.aio.client.Client:
        """Connect with a role's credential: "client", "worker", "operator" or "release"."""
        if role == "client":
            auth = self.client_credential().connect_options()
        else:
            prefix = {"worker": WORKER_INBOX_PREFIX, "operator": OPERATOR_INBOX_PREFIX, "release": RELEASE_INBOX_PREFIX}[role]
            auth = load_user_credentials(getattr(self.credentials, role)).connect_options(prefix)
        if self.tls_ca is not None:
            auth["tls"] = tls_context(self.tls_ca)
        return await nats.connect(url or self.url, max_reconnect_attempts=1, connect_timeout=5, **auth, **options)


def start_secure_broker(
    directory: Path, *, tls: ServerTls | None = None, tls_ca: Path | None = None, leafnode: bool = False, relay: bool = False
) -> SecureBroker:
    """Start nats-server in operator mode with fresh credentials in `directory`; `relay` adds relay RELAY_NAME."""
    directory.mkdir(parents=True, exist_ok=True)
    state = stack.StackState(directory)
    authority = state.credentials.create()
    if relay:
        authority = state.credentials.add_relay(RELAY_NAME)
    port = stack.free_port()
    leafnode_port = stack.free_port() if leafnode else None
    process, url = stack.start_broker(state, stack.HOST, port, authority=authority, tls=tls, leafnode_port=leafnode_port)
    stack.wait_for_port(stack.HOST, port, 15, process)
    return SecureBroker(url, port, process, directory, state.credentials, authority, tls_ca, leafnode_port)


def publish_release_log(broker: SecureBroker, pool: Pool) -> None:
    """Publish the pool's release log with the release credential, as `confide up` does."""

    async def publish() -> None:
        with ReleaseLog(pool.release_log) as log:
            leaves = [log.leaf(index) for index in range(log.size)]
            signed_head = log.sign_tree_head(pool.log_key)
        nc = await broker.connect_as("release")
        try:
            await publish_log(nc.jetstream(), leaves, signed_head)
        finally:
            await nc.close()

    # In a thread with its own event loop: callers may be inside one already.
    with ThreadPoolExecutor(1) as executor:
        executor.submit(asyncio.run, publish()).result(timeout=30)


def start_secure_worker(broker: SecureBroker, pool: Pool, directory: Path, url: str | None = None, name: str = "worker") -> WorkerProcess:
    """Start `confide worker` with the worker credential and wait until it takes jobs."""
    publish_release_log(broker, pool)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{name}.log"
    stats_path = directory / f"{name}.stats.json"
    command = [
        sys.executable, "-m", "confide.cli", "worker",
        "--broker", url or broker.url,
        "--creds", str(broker.credentials.worker),
        "--platform-key", str(pool.platform_key_path),
        "--trust", str(pool.trust_path),
        "--stats-file", str(stats_path),
        "--threads", "2",
    ]
    if broker.tls_ca is not None:
        command += ["--tls-ca", str(broker.tls_ca)]
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


@dataclass
class Relay:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    client_credential: ClientCredential


def start_relay(broker: SecureBroker, directory: Path) -> Relay:
    """Start relay RELAY_NAME in front of `broker`'s leaf node port and wait until it is linked.

    The broker must have been started with the relay in its authority (start_secure_broker(relay=True)).
    """
    assert broker.leafnode_port is not None
    assert RELAY_NAME in broker.authority.relay_signers
    directory.mkdir(parents=True, exist_ok=True)
    port = stack.free_port()
    authority = broker.authority
    config = directory / "relay.conf"
    config.write_text(
        render_relay_config(
            stack.HOST,
            port,
            f"nats-leaf://{stack.HOST}:{broker.leafnode_port}",
            broker.credentials.relay(RELAY_NAME),
            authority.relay_preload(),
            authority.operator_jwt(),
            authority.system_account.public_key,
            authority.account.public_key,
        ),
        encoding="utf-8",
    )
    log_path = directory / "relay.log"
    process = subprocess.Popen(
        [stack.nats_server_binary(), "-c", str(config)], stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    stack.wait_for_port(stack.HOST, port, 15, process)
    _wait_for(lambda: b"Leafnode connection created" in log_path.read_bytes(), 15, "the relay did not link to the broker")
    return Relay(f"nats://{stack.HOST}:{port}", port, process, log_path, load_client_credential(broker.credentials.relay_client(RELAY_NAME)))


def _wait_for(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(0.05)


# -- TLS material -------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    ca: Path
    server: ServerTls


def make_tls_material(directory: Path, host: str = stack.HOST) -> TlsMaterial:
    """Write a throwaway CA and a server certificate for `host` (an IP address) signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "confide test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsMaterial(ca_path, ServerTls(cert_path, key_path))


# -- a forwarder that connects from another loopback address --------------------------------


@dataclass
class SourceForwarder:
    """Accepts on 127.0.0.1:port and connects to the target from `source`; a thread with its own event loop."""

    target_port: int
    source: str = CLIENT_SOURCE_ADDRESS
    port: int = 0
    sources: set[str] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"nats://{stack.HOST}:{self.port}"

    def start(self) -> SourceForwarder:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the forwarder did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, stack.HOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(stack.HOST, self.target_port, local_addr=(self.source, 0))
        except OSError:
            client_writer.close()
            return
        self.sources.add(target_writer.get_extra_info("sockname")[0])
        await asyncio.gather(_pipe(client_reader, target_writer), _pipe(target_reader, client_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
