"""`confide release`: append the installed worker's measurement to the release log.

The log operator keeps the log (SQLite) and its Ed25519 signing key. After
each append it signs a new tree head and publishes the leaves and the head
to the broker, where workers and clients read them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nats
import nats.errors

from confide import __version__
from confide.schemas import crypto
from confide.schemas.release_feed import publish_log
from confide.schemas.release_log import ReleaseLog
from confide.schemas.transparency import ReleaseRecord


def load_or_create_log_key(path: Path) -> crypto.SigningKey:
    """Load the log's signing key (32-byte seed, mode 0600), creating it on first use."""
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != crypto.KEY_SIZE:
            raise ValueError(f"the release log key {path} must hold {crypto.KEY_SIZE} bytes, found {len(seed)}")
        return crypto.SigningKey(seed)

    key = crypto.SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.seed)
    return key


def append_release(log_path: Path, measurement: bytes, version: str = __version__) -> tuple[int, bool]:
    """Append `measurement` unless the log already lists it; return (leaf index, appended)."""
    with ReleaseLog(log_path) as log:
        existing = log.find(measurement)
        if existing:
            return existing[-1], False
        return log.append(ReleaseRecord(measurement, version, int(time.time()))), True


async def publish_release_log(url: str, log_path: Path, log_key: crypto.SigningKey, connect_options: dict | None = None) -> int:
    """Sign the log's current tree head and publish it with every leaf; return the tree size.

    `connect_options` carries the release credential and TLS settings for a
    broker that requires them (broker_config/credentials.py).
    """
    with ReleaseLog(log_path) as log:
        leaves = [log.leaf(index) for index in range(log.size)]
        signed_head = log.sign_tree_head(log_key)

    nc = await nats.connect(url, name="confide-release", max_reconnect_attempts=2, connect_timeout=5, **(connect_options or {}))
    try:
        await publish_log(nc.jetstream(), leaves, signed_head)
    finally:
        await nc.close()
    return len(leaves)
