"""Tests of ReleaseLog, the SQLite file behind the release transparency log."""

from __future__ import annotations

import sqlite3

import pytest

from confide.errors import TransparencyError
from confide.schemas import crypto, transparency
from confide.schemas.codec import encode
from confide.schemas.release_log import ReleaseLog
from confide.schemas.transparency import EMPTY_ROOT, ReleaseRecord, verify_tree_head


def release(number: int) -> ReleaseRecord:
    return ReleaseRecord(number.to_bytes(32, "big"), f"1.{number}.0", 1_700_000_000 + number)


@pytest.fixture
def log_key() -> crypto.SigningKey:
    return crypto.SigningKey(bytes(range(1, 33)))


@pytest.fixture
def log(tmp_path):
    with ReleaseLog(tmp_path / "releases.sqlite") as release_log:
        yield release_log


def test_empty_log_has_empty_root(log):
    """A new log has no leaves and the empty-tree root."""
    assert log.size == 0
    assert log.root_hash() == EMPTY_ROOT
    assert log.tree_head(timestamp=5).tree_size == 0


def test_append_returns_consecutive_indexes(log):
    """Appends return 0, 1, 2, ... and the records read back unchanged."""
    indexes = [log.append(release(number)) for number in range(5)]

    assert indexes == [0, 1, 2, 3, 4]
    assert log.size == 5
    assert [log.record(index) for index in indexes] == [release(number) for number in range(5)]
    assert log.leaf(3) == release(3).to_leaf()


def test_root_matches_transparency_module(log):
    """The log's root for every prefix equals the root of the records' leaf hashes."""
    records = [release(number) for number in range(9)]
    for record in records:
        log.append(record)

    for size in range(10):
        assert log.root_hash(size) == transparency.root_hash([record.leaf_hash() for record in records[:size]])
    with pytest.raises(ValueError, match="tree size 10"):
        log.root_hash(10)


def test_log_survives_reopen(tmp_path):
    """Leaves written by one ReleaseLog are read by the next one on the same file."""
    path = tmp_path / "releases.sqlite"
    with ReleaseLog(path) as first:
        first.append(release(1))
        first.append(release(2))
        root = first.root_hash()

    with ReleaseLog(path) as second:
        assert second.size == 2
        assert second.root_hash() == root
        assert second.append(release(3)) == 2


def test_inclusion_proofs_verify_against_signed_head(log, log_key):
    """Every leaf's proof verifies against a signed tree head that a client checked."""
    for number in range(12):
        log.append(release(number))
    wire = log.sign_tree_head(log_key, timestamp=1_700_000_500).to_wire()

    head = verify_tree_head(wire, log_key.verify_key)

    assert head.tree_size == 12
    for index in range(12):
        proof = transparency.InclusionProof.from_wire(log.prove_inclusion(index).to_wire())
        proof.verify(log.leaf(index), head)
        with pytest.raises(TransparencyError):
            proof.verify(release(99).to_leaf(), head)


def test_consistency_between_heads_after_appends(log, log_key):
    """A head signed before more appends is consistent with every later head."""
    heads = []
    for number in range(20):
        log.append(release(number))
        heads.append(verify_tree_head(log.sign_tree_head(log_key, timestamp=number).to_wire(), log_key.verify_key))

    for old in heads:
        for new in heads[heads.index(old) :]:
            proof = log.prove_consistency(old.tree_size, new.tree_size)
            transparency.ConsistencyProof.from_wire(proof.to_wire()).verify(old, new)


def test_proof_for_older_tree_size(log):
    """An inclusion proof can be built for a tree smaller than the log."""
    for number in range(10):
        log.append(release(number))

    proof = log.prove_inclusion(3, tree_size=6)

    assert proof.tree_size == 6
    transparency.verify_inclusion(release(3).leaf_hash(), 3, 6, proof.path, log.root_hash(6))
    with pytest.raises(ValueError, match="leaf index 7"):
        log.prove_inclusion(7, tree_size=6)


def test_find_returns_every_index_of_measurement(log):
    """find() lists each leaf index of a measurement and nothing for an unknown one."""
    log.append(release(1))
    log.append(release(2))
    log.append(ReleaseRecord(release(1).measurement, "1.1.1", 1_800_000_000))

    assert log.find(release(1).measurement) == [0, 2]
    assert log.find(release(2).measurement) == [1]
    assert log.find(bytes(32)) == []


def test_record_outside_log_raises(log):
    """Reading a leaf past the end raises IndexError with the log's size."""
    log.append(release(1))

    with pytest.raises(IndexError, match="leaf index 1 is outside a release log of 1 leaves"):
        log.record(1)


def test_update_and_delete_rejected(tmp_path):
    """SQLite triggers reject any UPDATE or DELETE of a stored leaf."""
    path = tmp_path / "releases.sqlite"
    with ReleaseLog(path) as release_log:
        release_log.append(release(1))

    database = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            database.execute("UPDATE leaves SET leaf = ? WHERE leaf_index = 0", (release(2).to_leaf(),))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            database.execute("DELETE FROM leaves")
    finally:
        database.close()


def test_gap_in_leaves_detected(tmp_path):
    """A file whose leaf indexes have a gap is reported as damaged when opened."""
    path = tmp_path / "releases.sqlite"
    with ReleaseLog(path) as release_log:
        release_log.append(release(1))
    database = sqlite3.connect(path)
    database.execute("INSERT INTO leaves (leaf_index, leaf) VALUES (5, ?)", (release(2).to_leaf(),))
    database.commit()
    database.close()

    with pytest.raises(TransparencyError, match="numbered up to 5: the file is damaged"):
        ReleaseLog(path)


def test_invalid_leaf_detected(tmp_path):
    """A stored leaf that is not a release record is reported with its index."""
    path = tmp_path / "releases.sqlite"
    with ReleaseLog(path) as release_log:
        release_log.append(release(1))
    database = sqlite3.connect(path)
    database.execute("INSERT INTO leaves (leaf_index, leaf) VALUES (1, ?)", (encode(["not", "a", "release"]),))
    database.commit()
    database.close()

    with ReleaseLog(path) as release_log:
        with pytest.raises(TransparencyError, match="invalid leaf at index 1"):
            release_log.root_hash()


def test_unknown_schema_version_rejected(tmp_path):
    """A file written by a newer schema is rejected rather than changed."""
    path = tmp_path / "releases.sqlite"
    database = sqlite3.connect(path)
    database.execute("PRAGMA user_version = 7")
    database.close()

    with pytest.raises(TransparencyError, match="schema version 7, expected 1"):
        ReleaseLog(path)


def test_file_that_is_not_sqlite_rejected(tmp_path):
    """A file that is not an SQLite database fails with its path."""
    path = tmp_path / "releases.sqlite"
    path.write_bytes(b"this is not a database" * 100)

    with pytest.raises(TransparencyError, match="is not a readable release log"):
        ReleaseLog(path)
