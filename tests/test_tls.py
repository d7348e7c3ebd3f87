"""A broker that requires TLS: a job over TLS, connections without the right CA refused, production configs.

The CA and the server certificate are generated for this test and thrown
away with its temporary directory.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

import nats
import nats.errors
import pytest

from conftest import stop
from secure_stack import make_tls_material, start_secure_broker, start_secure_worker
from confide import stack
from confide.clients.client import Client
from confide.errors import BrokerError
from confide.schemas.messages import ChatMessage, GenerationParams

pytestmark = pytest.mark.anyio


async def test_job_over_tls(pool, tmp_path):
    """A worker and a client that trust the broker's CA run a job; without TLS or with another CA they cannot connect."""
    tls = make_tls_material(tmp_path / "tls")
    other = make_tls_material(tmp_path / "other-ca")
    broker = start_secure_broker(tmp_path / "broker", tls=tls.server, tls_ca=tls.ca)
    worker = None
    try:
        assert broker.url.startswith("tls://")
        worker = start_secure_worker(broker, pool, tmp_path / "worker")
        async with await Client.connect(broker.url, pool.policy, reply_timeout_s=120, credentials=broker.client_credential(), tls_ca=tls.ca) as client:
            reply = await client.ask_text([ChatMessage("user", "Name a planet.")], GenerationParams(max_tokens=16, temperature=0.0))

        with pytest.raises(BrokerError):
            await Client.connect(broker.url, pool.policy, credentials=broker.client_credential(), tls_ca=other.ca)
        plain_url = broker.url.replace("tls://", "nats://")
        with pytest.raises((nats.errors.Error, ssl.SSLError, OSError)):
            await nats.connect(plain_url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=5, **broker.client_credential().connect_options())
    finally:
        if worker is not None:
            stop(worker.process)
        stop(broker.process)

    assert reply.strip()
    assert b"tls" in (broker.directory / "broker.conf").read_bytes()


def confide(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "confide.cli", *args], capture_output=True, text=True, timeout=120)


def config_is_valid(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([stack.nats_server_binary(), "-c", str(config), "-t"], capture_output=True, text=True, timeout=60)


def test_production_and_relay_configs(tmp_path):
    """`confide broker-config` and `relay-config` write configurations nats-server accepts, with TLS and secret files private."""
    tls = make_tls_material(tmp_path / "tls")
    production = tmp_path / "production"
    written = confide(
        "broker-config", str(production), "--tls-cert", str(tls.server.cert), "--tls-key", str(tls.server.key), "--leafnode-port", "7422"
    )
    assert written.returncode == 0, written.stderr
    config = production / "nats-server.conf"
    checked = config_is_valid(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = config.read_text()
    assert text.count("tls {") == 2  # client and leaf node connections
    assert "operator:" in text
    assert "http_port" not in text
    for name in ("authority.json", "client.creds", "worker.creds", "operator.creds", "release.creds"):
        assert (production / name).stat().st_mode & 0o777 == 0o600, name

    relay = tmp_path / "relay"
    written = confide(
        "relay-config", str(relay), "--name", "edge", "--authority", str(production), "--broker-leaf", "nats-leaf://127.0.0.1:7422",
        "--broker-ca", str(tls.ca), "--tls-cert", str(tls.server.cert), "--tls-key", str(tls.server.key),
    )
    assert written.returncode == 0, written.stderr
    checked = config_is_valid(relay / "relay.conf")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert sorted(path.name for path in relay.iterdir()) == ["client.creds", "relay.conf", "relay.creds"]
    assert json.loads((relay / "client.creds").read_text())["inbox_root"] == "_INBOX_RELAY_edge"
    authority = json.loads((production / "authority.json").read_text())
    seeds = [authority["operator"], authority["system_account"], authority["account"], authority["client_signer"]]
    relay_text = "".join((relay / name).read_text() for name in ("relay.conf", "relay.creds", "client.creds"))
    assert not any(seed in relay_text for seed in seeds)
    assert "edge" in authority["relay_signers"]
