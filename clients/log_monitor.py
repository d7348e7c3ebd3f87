"""The device's memory of the release log: detect a log that shows different histories.

Each verified tree head is checked against the last one this device
stored. The pool is rejected in three cases, each of which means the log
showed this device a history that does not extend what it saw before: a
smaller tree, the same size with another root, or a larger tree without a
valid consistency proof (RFC 6962 section 2.1.2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nats.js import JetStreamContext

from confide.errors import AttestationError, TransparencyError
from confide.schemas import crypto
from confide.schemas.release_feed import consistency_between, read_log
from confide.schemas.transparency import TreeHead


class LogMonitor:
    def __init__(self, path: Path) -> None:
        self.path = path

    def stored(self) -> TreeHead | None:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            return TreeHead(int(record["tree_size"]), bytes.fromhex(record["root_hash"]), int(record["timestamp"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AttestationError(f"the stored release log head {self.path} is unreadable ({type(exc).__name__}); delete it to start over") from None

    def _store(self, head: TreeHead) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(
            json.dumps({"tree_size": head.tree_size, "root_hash": head.root_hash.hex(), "timestamp": head.timestamp}), encoding="utf-8"
        )
        os.replace(temporary, self.path)

    async def check(self, js: JetStreamContext, head: TreeHead, log_key: bytes) -> str:
        """Check `head` against the stored one, store it if it extends it; return what was checked."""
        stored = self.stored()
        if stored is None:
            self._store(head)
            return f"first tree head seen (size {head.tree_size}); stored for later checks"
        if head.tree_size < stored.tree_size:
            raise AttestationError(
                f"the release log shows {head.tree_size} releases after showing {stored.tree_size}: it presents different histories"
            )
        if head.tree_size == stored.tree_size:
            if not crypto.constant_time_equal(head.root_hash, stored.root_hash):
                raise AttestationError(f"the release log shows two different trees of size {head.tree_size}: it presents different histories")
            return f"same tree as stored (size {head.tree_size})"

        try:
            _, _, leaves = await read_log(js, log_key)
            if len(leaves) < head.tree_size:
                raise TransparencyError(f"the published log has {len(leaves)} leaves, fewer than the {head.tree_size} the worker proved against")
            consistency_between(leaves[: head.tree_size], stored.tree_size).verify(stored, head)
        except TransparencyError as exc:
            raise AttestationError(f"the release log is not consistent with the tree head stored on this device: {exc}") from None
        self._store(head)
        return f"consistent with the stored tree head (size {stored.tree_size} -> {head.tree_size})"
