"""The release log's storage: an append-only list of release leaves in one SQLite file.

The file contains one row per leaf, numbered from 0 without gaps. Triggers
make SQLite reject every UPDATE and DELETE, so leaves can only be appended.
The operator can still edit the file with other tools, which is why clients
check signed tree heads and consistency proofs instead of trusting it.
Appends take SQLite's write lock (BEGIN IMMEDIATE), so two processes
appending at once get consecutive indexes.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from confide.errors import DecodeError, TransparencyError
from confide.schemas import transparency
from confide.schemas.crypto import SigningKey
from confide.schemas.transparency import ConsistencyProof, InclusionProof, ReleaseRecord, SignedTreeHead, TreeHead

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves (
    leaf_index INTEGER PRIMARY KEY CHECK (leaf_index >= 0),
    leaf BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS leaves_no_update BEFORE UPDATE ON leaves
BEGIN
    SELECT RAISE(ABORT, 'the release log is append-only');
END;
CREATE TRIGGER IF NOT EXISTS leaves_no_delete BEFORE DELETE ON leaves
BEGIN
    SELECT RAISE(ABORT, 'the release log is append-only');
END;
"""


class ReleaseLog:
    """An append-only release transparency log kept in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Autocommit mode: every write below opens its own explicit transaction.
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._initialize()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise TransparencyError(f"{path} is not a readable release log ({exc}): check the path") from None
        except BaseException:
            self._db.close()
            raise

    def _initialize(self) -> None:
        (schema_version,) = self._db.execute("PRAGMA user_version").fetchone()
        if schema_version not in (0, SCHEMA_VERSION):
            raise TransparencyError(f"release log {self.path} has schema version {schema_version}, expected {SCHEMA_VERSION}")

        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._check_contiguous()

    @property
    def size(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM leaves").fetchone()
        return count

    def append(self, record: ReleaseRecord) -> int:
        """Append one release and return its leaf index."""
        leaf = record.to_leaf()

        self._db.execute("BEGIN IMMEDIATE")
        try:
            (index,) = self._db.execute("SELECT COUNT(*) FROM leaves").fetchone()
            self._db.execute("INSERT INTO leaves (leaf_index, leaf) VALUES (?, ?)", (index, leaf))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return index

    def record(self, leaf_index: int) -> ReleaseRecord:
        row = self._db.execute("SELECT leaf FROM leaves WHERE leaf_index = ?", (leaf_index,)).fetchone()
        if row is None:
            raise IndexError(f"leaf index {leaf_index} is outside a release log of {self.size} leaves")
        return self._decode(leaf_index, row[0])

    def leaf(self, leaf_index: int) -> bytes:
        """Return the stored leaf bytes: what a client hashes to check an inclusion proof."""
        return self.record(leaf_index).to_leaf()

    def find(self, measurement: bytes) -> list[int]:
        """Return the leaf indexes of every release with this measurement, oldest first."""
        rows = self._db.execute("SELECT leaf_index, leaf FROM leaves ORDER BY leaf_index")
        return [index for index, leaf in rows if self._decode(index, leaf).measurement == measurement]

    def root_hash(self, tree_size: int | None = None) -> bytes:
        return transparency.root_hash(self._leaf_hashes(tree_size))

    def tree_head(self, timestamp: int | None = None) -> TreeHead:
        leaf_hashes = self._leaf_hashes(None)
        stamp = int(time.time()) if timestamp is None else timestamp
        return TreeHead(len(leaf_hashes), transparency.root_hash(leaf_hashes), stamp)

    def sign_tree_head(self, log_key: SigningKey, timestamp: int | None = None) -> SignedTreeHead:
        return transparency.sign_tree_head(self.tree_head(timestamp), log_key)

    def prove_inclusion(self, leaf_index: int, tree_size: int | None = None) -> InclusionProof:
        """Build the inclusion proof of one leaf in the tree of `tree_size` leaves (default: all)."""
        leaf_hashes = self._leaf_hashes(tree_size)
        path = transparency.inclusion_path(leaf_hashes, leaf_index)
        return InclusionProof(leaf_index, len(leaf_hashes), tuple(path))

    def prove_consistency(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Build the proof that the tree of `new_size` leaves (default: all) extends the one of `old_size`."""
        leaf_hashes = self._leaf_hashes(new_size)
        path = transparency.consistency_path(leaf_hashes, old_size)
        return ConsistencyProof(old_size, len(leaf_hashes), tuple(path))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReleaseLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReleaseLog(path={self.path}, size={self.size})"

    def _leaf_hashes(self, tree_size: int | None) -> list[bytes]:
        size = self.size
        if tree_size is None:
            tree_size = size
        if not 0 <= tree_size <= size:
            raise ValueError(f"tree size {tree_size} is outside the release log's {size} leaves")

        rows = self._db.execute("SELECT leaf_index, leaf FROM leaves WHERE leaf_index < ? ORDER BY leaf_index", (tree_size,))
        hashes = []
        for expected_index, (index, leaf) in enumerate(rows):
            if index != expected_index:
                raise TransparencyError(f"release log {self.path} has no leaf {expected_index}: the file is damaged")
            self._decode(index, leaf)
            hashes.append(transparency.leaf_hash(leaf))
        return hashes

    def _decode(self, leaf_index: int, leaf: object) -> ReleaseRecord:
        if not isinstance(leaf, bytes):
            raise TransparencyError(f"release log {self.path} stores a non-binary leaf at index {leaf_index}: the file is damaged")
        try:
            return ReleaseRecord.from_leaf(leaf)
        except DecodeError as exc:
            raise TransparencyError(f"release log {self.path} has an invalid leaf at index {leaf_index} ({exc.reason}): the file is damaged") from None

    def _check_contiguous(self) -> None:
        count, highest = self._db.execute("SELECT COUNT(*), MAX(leaf_index) FROM leaves").fetchone()
        if count and highest != count - 1:
            raise TransparencyError(f"release log {self.path} has {count} leaves numbered up to {highest}: the file is damaged")
