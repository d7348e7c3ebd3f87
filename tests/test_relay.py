"""A relay (a leaf node run by another party) hides the client's address from the broker.

The client connects from 127.0.0.7 to the relay, which keeps one leaf
connection to the broker's leaf node port. The worker connects to the
broker directly. The broker's own log is kept without the address filter
here, to show that the only address in it is the relay's.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import stop
from secure_stack import (
    CLIENT_SOURCE_ADDRESS,
    RELAY_NAME,
    SecureBroker,
    SourceForwarder,
    start_relay,
    start_secure_worker,
)
from confide import stack
from confide.broker_config import render_server_config
from confide.clients.client import Client
from confide.errors import BrokerError
from confide.schemas.messages import ChatMessage, GenerationParams

pytestmark = pytest.mark.anyio

QUICK = GenerationParams(max_tokens=16, temperature=0.0)


def start_broker_with_raw_log(directory) -> SecureBroker:
    """Start the broker in operator mode with a leaf node port, its log written unfiltered."""
    directory.mkdir(parents=True, exist_ok=True)
    state = stack.StackState(directory)
    state.credentials.create()
    authority = state.credentials.add_relay(RELAY_NAME)
    port, leafnode_port = stack.free_port(), stack.free_port()
    config = directory / "broker.conf"
    config.write_text(
        render_server_config(stack.HOST, port, directory / "jetstream", authority=authority, leafnode_port=leafnode_port), encoding="utf-8"
    )
    process = subprocess.Popen(
        [stack.nats_server_binary(), "-c", str(config)],
        stdout=open(directory / "broker.log", "wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    stack.wait_for_port(stack.HOST, port, 15, process)
    return SecureBroker(f"nats://{stack.HOST}:{port}", port, process, directory, state.credentials, authority, leafnode_port=leafnode_port)


async def test_job_through_relay_hides_client_address(pool, tmp_path):
    """A job sent through the relay completes; the broker's log and store hold the relay's address, never the client's."""
    broker = start_broker_with_raw_log(tmp_path / "broker")
    worker = relay = forwarder = None
    try:
        worker = start_secure_worker(broker, pool, tmp_path / "worker")
        relay = start_relay(broker, tmp_path / "relay")
        forwarder = SourceForwarder(relay.port).start()
        async with await Client.connect(forwarder.url, pool.policy, reply_timeout_s=120, credentials=relay.client_credential) as client:
            job = await client.submit([ChatMessage("user", "Name a bird.")], QUICK)
            reply = "".join([event.text async for event in client.replies(job)])
        assert forwarder.sources == {CLIENT_SOURCE_ADDRESS}

        # A direct client's inbox is outside the relay's reach: through the
        # relay, no JetStream response to it arrives.
        with pytest.raises(BrokerError):
            async with await Client.connect(relay.url, pool.policy, reply_timeout_s=5, credentials=broker.client_credential()) as stray:
                await stray.attest()
    finally:
        for component in (forwarder,):
            if component is not None:
                component.stop()
        for process in (relay and relay.process, worker and worker.process, broker.process):
            if process is not None:
                stop(process)

    assert reply.strip()
    log = broker.output()
    leaf_lines = [line for line in log.splitlines() if b"Leafnode connection created" in line]
    assert leaf_lines, "the broker log shows no leaf connection"
    assert all(f"{stack.HOST}:".encode() in line for line in leaf_lines)
    address = CLIENT_SOURCE_ADDRESS.encode()
    assert address not in log
    stored = [(path, path.read_bytes()) for path in sorted((broker.directory / "jetstream").rglob("*")) if path.is_file()]
    assert any(job.reply_subject.encode() in data for _, data in stored)
    for path, data in stored:
        assert address not in data, f"{CLIENT_SOURCE_ADDRESS} found in {path}"
