"""Tests of the release transparency log's Merkle tree, proofs and signed tree heads.

Expected roots and proofs come from a second implementation written here
straight from the recursive definitions of RFC 6962 section 2.1. It slices
lists and shares no code with schemas/transparency.py, so a mistake in the
module's index arithmetic cannot hide behind the same mistake in its test.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.errors import DecodeError, TransparencyError
from confide.schemas import crypto, transparency
from confide.schemas.codec import encode
from confide.schemas.transparency import (
    EMPTY_ROOT,
    HASH_SIZE,
    ConsistencyProof,
    InclusionProof,
    ReleaseRecord,
    SignedTreeHead,
    TreeHead,
    consistency_path,
    inclusion_path,
    leaf_hash,
    node_hash,
    root_hash,
    sign_tree_head,
    verify_consistency,
    verify_inclusion,
    verify_tree_head,
)

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_EXHAUSTIVE_SIZE = 40


# -- the reference: RFC 6962 section 2.1 written as recursion over lists ----------


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def largest_power_of_two_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def reference_mth(leaves: list[bytes]) -> bytes:
    if len(leaves) == 0:
        return sha256(b"")
    if len(leaves) == 1:
        return sha256(b"\x00" + leaves[0])
    k = largest_power_of_two_below(len(leaves))
    return sha256(b"\x01" + reference_mth(leaves[:k]) + reference_mth(leaves[k:]))


def reference_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = largest_power_of_two_below(len(leaves))
    if m < k:
        return reference_path(m, leaves[:k]) + [reference_mth(leaves[k:])]
    return reference_path(m - k, leaves[k:]) + [reference_mth(leaves[:k])]


def reference_subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [reference_mth(leaves)]
    k = largest_power_of_two_below(n)
    if m <= k:
        return reference_subproof(m, leaves[:k], complete) + [reference_mth(leaves[k:])]
    return reference_subproof(m - k, leaves[k:], False) + [reference_mth(leaves[:k])]


def make_leaves(count: int) -> list[bytes]:
    """Distinct leaves of varied lengths, including the empty leaf."""
    return [bytes([i % 251]) * (i % 7) + i.to_bytes(2, "big") if i else b"" for i in range(count)]


def hashes_of(leaves: list[bytes]) -> list[bytes]:
    return [leaf_hash(leaf) for leaf in leaves]


def flip(value: bytes, position: int = 0) -> bytes:
    changed = bytearray(value)
    changed[position] ^= 0x01
    return bytes(changed)


# -- known-answer tests -----------------------------------------------------------


def test_empty_tree_root_is_sha256_of_nothing():
    """The root of the empty tree is SHA-256 of the empty string."""
    assert root_hash([]) == EMPTY_ROOT
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_leaf_and_node_hash_use_domain_prefixes():
    """Leaf hashes prefix 0x00 and node hashes 0x01, so a node never equals a leaf."""
    left, right = sha256(b"l"), sha256(b"r")

    assert leaf_hash(b"abc") == sha256(b"\x00abc")
    assert node_hash(left, right) == sha256(b"\x01" + left + right)
    assert leaf_hash(left + right) != node_hash(left, right)


def test_small_tree_roots_written_out():
    """Roots of trees with 1, 2, 3, 4, 5 and 7 leaves match the tree shapes of RFC 6962."""
    a, b, c, d, e, f, g = (leaf_hash(bytes([x])) for x in b"abcdefg")

    assert root_hash([a]) == a
    assert root_hash([a, b]) == node_hash(a, b)
    assert root_hash([a, b, c]) == node_hash(node_hash(a, b), c)
    assert root_hash([a, b, c, d]) == node_hash(node_hash(a, b), node_hash(c, d))
    assert root_hash([a, b, c, d, e]) == node_hash(node_hash(node_hash(a, b), node_hash(c, d)), e)
    assert root_hash([a, b, c, d, e, f, g]) == node_hash(
        node_hash(node_hash(a, b), node_hash(c, d)),
        node_hash(node_hash(e, f), g),
    )


@pytest.mark.parametrize("size", range(1, 66))
def test_root_matches_reference(size):
    """The module's root equals the reference recursion for every size up to 65."""
    leaves = make_leaves(size)

    assert root_hash(hashes_of(leaves)) == reference_mth(leaves)


def test_small_tree_paths_written_out():
    """The inclusion paths of a 7-leaf tree list the nearest sibling first."""
    a, b, c, d, e, f, g = (leaf_hash(bytes([x])) for x in b"abcdefg")
    hashes = [a, b, c, d, e, f, g]

    assert inclusion_path(hashes, 0) == [b, node_hash(c, d), node_hash(node_hash(e, f), g)]
    assert inclusion_path(hashes, 3) == [c, node_hash(a, b), node_hash(node_hash(e, f), g)]
    assert inclusion_path(hashes, 4) == [f, g, node_hash(node_hash(a, b), node_hash(c, d))]
    assert inclusion_path(hashes, 6) == [node_hash(e, f), node_hash(node_hash(a, b), node_hash(c, d))]


def test_small_tree_consistency_written_out():
    """The consistency proofs of RFC 6962 section 2.1.3's 7-leaf example tree."""
    a, b, c, d, e, f, g = (leaf_hash(bytes([x])) for x in b"abcdefg")
    hashes = [a, b, c, d, e, f, g]
    k, l = node_hash(a, b), node_hash(c, d)
    i = node_hash(e, f)

    assert consistency_path(hashes, 3) == [c, d, k, node_hash(i, g)]
    assert consistency_path(hashes, 4) == [node_hash(i, g)]
    assert consistency_path(hashes, 6) == [i, g, node_hash(k, l)]
    assert consistency_path(hashes, 7) == []


# -- inclusion proofs ------------------------------------------------------------


@pytest.mark.parametrize("size", range(1, MAX_EXHAUSTIVE_SIZE + 1))
def test_inclusion_every_leaf_verifies(size):
    """Every leaf's path equals the reference PATH and passes RFC 9162 verification."""
    leaves = make_leaves(size)
    hashes = hashes_of(leaves)
    root = root_hash(hashes)

    for index in range(size):
        path = inclusion_path(hashes, index)
        assert path == reference_path(index, leaves), f"leaf {index}"
        assert len(path) == transparency.inclusion_path_length(index, size)
        verify_inclusion(hashes[index], index, size, path, root)


@pytest.mark.parametrize("size", range(1, MAX_EXHAUSTIVE_SIZE + 1))
def test_inclusion_other_leaf_or_index_rejected(size):
    """A path proves only its own leaf at its own index: every other leaf and index fails."""
    hashes = hashes_of(make_leaves(size))
    root = root_hash(hashes)

    for index in range(size):
        path = inclusion_path(hashes, index)
        for other in range(size):
            if other == index:
                continue
            with pytest.raises(TransparencyError):
                verify_inclusion(hashes[other], index, size, path, root)
            with pytest.raises(TransparencyError):
                verify_inclusion(hashes[index], other, size, path, root)
        with pytest.raises(TransparencyError):
            verify_inclusion(leaf_hash(b"not in the tree"), index, size, path, root)


@pytest.mark.parametrize("size", range(1, MAX_EXHAUSTIVE_SIZE + 1))
def test_inclusion_other_size_or_root_rejected(size):
    """A path fails against the tree head of every other size up to 41 and against a changed root.

    A tree head signs its size and root together, so each other size is
    checked with the root of the tree that really has that size (the same
    leaves, cut or extended).
    """
    all_hashes = hashes_of(make_leaves(MAX_EXHAUSTIVE_SIZE + 1))
    hashes = all_hashes[:size]
    root = root_hash(hashes)

    for index in range(size):
        path = inclusion_path(hashes, index)
        for other_size in range(1, MAX_EXHAUSTIVE_SIZE + 2):
            if other_size == size:
                continue
            with pytest.raises(TransparencyError):
                verify_inclusion(hashes[index], index, other_size, path, root_hash(all_hashes[:other_size]))
        with pytest.raises(TransparencyError):
            verify_inclusion(hashes[index], index, size, path, flip(root))
        with pytest.raises(TransparencyError):
            verify_inclusion(hashes[index], index, size, path, root_hash(hashes[:-1] + [leaf_hash(b"other")]))


@pytest.mark.parametrize("size", range(2, MAX_EXHAUSTIVE_SIZE + 1))
def test_inclusion_path_changed_rejected(size):
    """A flipped, dropped or extra path hash fails verification."""
    hashes = hashes_of(make_leaves(size))
    root = root_hash(hashes)

    for index in range(size):
        path = inclusion_path(hashes, index)
        for position in range(len(path)):
            changed = list(path)
            changed[position] = flip(changed[position], position % HASH_SIZE)
            with pytest.raises(TransparencyError):
                verify_inclusion(hashes[index], index, size, changed, root)
        with pytest.raises(TransparencyError, match="too few"):
            verify_inclusion(hashes[index], index, size, path[:-1], root)
        with pytest.raises(TransparencyError, match="too many"):
            verify_inclusion(hashes[index], index, size, path + [root], root)


def test_inclusion_index_outside_tree_rejected():
    """A leaf index at or past the tree size, or negative, fails with a message naming it."""
    hashes = hashes_of(make_leaves(4))
    root = root_hash(hashes)
    path = inclusion_path(hashes, 3)

    with pytest.raises(TransparencyError, match="leaf index 4 is outside a tree of 4 leaves"):
        verify_inclusion(hashes[3], 4, 4, path, root)
    with pytest.raises(TransparencyError, match="outside"):
        verify_inclusion(hashes[3], -1, 4, path, root)
    with pytest.raises(TransparencyError, match="outside"):
        verify_inclusion(hashes[0], 0, 0, [], EMPTY_ROOT)


def test_inclusion_wrong_hash_lengths_rejected():
    """A leaf hash, root or path hash of the wrong length fails before any hashing."""
    hashes = hashes_of(make_leaves(3))
    root = root_hash(hashes)
    path = inclusion_path(hashes, 0)

    with pytest.raises(TransparencyError, match="leaf hash is 31 bytes, expected 32"):
        verify_inclusion(hashes[0][:31], 0, 3, path, root)
    with pytest.raises(TransparencyError, match="root hash is 33 bytes"):
        verify_inclusion(hashes[0], 0, 3, path, root + b"\x00")
    with pytest.raises(TransparencyError, match="proof hash 1 is 0 bytes"):
        verify_inclusion(hashes[0], 0, 3, [path[0], b""], root)


@PROPERTY_SETTINGS
@given(size=st.integers(1, 300), data=st.data())
def test_inclusion_random_trees(size, data):
    """In random trees up to 300 leaves, a proof verifies and any flipped path bit fails."""
    hashes = hashes_of(make_leaves(size))
    root = root_hash(hashes)
    index = data.draw(st.integers(0, size - 1))
    path = inclusion_path(hashes, index)

    verify_inclusion(hashes[index], index, size, path, root)

    if path:
        position = data.draw(st.integers(0, len(path) - 1))
        bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
        changed = list(path)
        changed[position] = bytes(b ^ (1 << bit % 8) if i == bit // 8 else b for i, b in enumerate(changed[position]))
        with pytest.raises(TransparencyError):
            verify_inclusion(hashes[index], index, size, changed, root)


# -- consistency proofs ----------------------------------------------------------


@pytest.mark.parametrize("new_size", range(1, MAX_EXHAUSTIVE_SIZE + 1))
def test_consistency_every_pair_verifies(new_size):
    """Every proof between sizes m <= n equals the reference PROOF and passes verification."""
    leaves = make_leaves(new_size)
    hashes = hashes_of(leaves)
    new_root = root_hash(hashes)

    for old_size in range(1, new_size + 1):
        old_root = root_hash(hashes[:old_size])
        path = consistency_path(hashes, old_size)
        assert path == reference_subproof(old_size, leaves, True), f"old size {old_size}"
        assert len(path) == transparency.consistency_path_length(old_size, new_size)
        verify_consistency(old_size, new_size, old_root, new_root, path)


@pytest.mark.parametrize("new_size", range(2, MAX_EXHAUSTIVE_SIZE + 1))
def test_consistency_changed_root_rejected(new_size):
    """A proof fails when the old or the new root is changed, or comes from another tree."""
    hashes = hashes_of(make_leaves(new_size))
    new_root = root_hash(hashes)
    other_hashes = hashes_of([b"other " + leaf for leaf in make_leaves(new_size)])

    for old_size in range(1, new_size):
        old_root = root_hash(hashes[:old_size])
        path = consistency_path(hashes, old_size)
        with pytest.raises(TransparencyError):
            verify_consistency(old_size, new_size, flip(old_root), new_root, path)
        with pytest.raises(TransparencyError):
            verify_consistency(old_size, new_size, root_hash(other_hashes[:old_size]), new_root, path)
        with pytest.raises(TransparencyError):
            verify_consistency(old_size, new_size, old_root, flip(new_root, 31), path)


@pytest.mark.parametrize("new_size", range(2, MAX_EXHAUSTIVE_SIZE + 1))
def test_consistency_changed_path_or_sizes_rejected(new_size):
    """A flipped, dropped or extra proof hash fails, and so do the tree heads of other sizes."""
    hashes = hashes_of(make_leaves(new_size))
    new_root = root_hash(hashes)

    for old_size in range(1, new_size):
        old_root = root_hash(hashes[:old_size])
        path = consistency_path(hashes, old_size)
        for position in range(len(path)):
            changed = list(path)
            changed[position] = flip(changed[position], 7)
            with pytest.raises(TransparencyError):
                verify_consistency(old_size, new_size, old_root, new_root, changed)
        with pytest.raises(TransparencyError):
            verify_consistency(old_size, new_size, old_root, new_root, path[:-1])
        with pytest.raises(TransparencyError):
            verify_consistency(old_size, new_size, old_root, new_root, path + [new_root])
        for other_old in range(1, new_size):
            if other_old != old_size:
                with pytest.raises(TransparencyError):
                    verify_consistency(other_old, new_size, root_hash(hashes[:other_old]), new_root, path)
        with pytest.raises(TransparencyError):
            verify_consistency(old_size, new_size + 1, old_root, root_hash(hashes + [leaf_hash(b"next")]), path)


def test_consistency_equal_sizes():
    """Equal sizes need an empty proof and equal roots, and different roots mean a fork."""
    hashes = hashes_of(make_leaves(5))
    root = root_hash(hashes)

    verify_consistency(5, 5, root, root, [])
    with pytest.raises(TransparencyError, match="must be empty"):
        verify_consistency(5, 5, root, root, [root])
    with pytest.raises(TransparencyError, match="forked"):
        verify_consistency(5, 5, root, flip(root), [])


def test_consistency_bad_sizes_rejected():
    """An old size of 0, a shrinking log and an empty path each fail with their own message."""
    hashes = hashes_of(make_leaves(6))
    root = root_hash(hashes)
    old_root = root_hash(hashes[:3])

    with pytest.raises(TransparencyError, match="old tree size is 0"):
        verify_consistency(0, 6, EMPTY_ROOT, root, [])
    with pytest.raises(TransparencyError, match="never shrinks"):
        verify_consistency(6, 3, root, old_root, consistency_path(hashes, 3))
    with pytest.raises(TransparencyError, match="is empty"):
        verify_consistency(3, 6, old_root, root, [])


@PROPERTY_SETTINGS
@given(new_size=st.integers(2, 300), data=st.data())
def test_consistency_random_trees(new_size, data):
    """In random trees up to 300 leaves, a proof verifies and fails for a changed old root."""
    hashes = hashes_of(make_leaves(new_size))
    old_size = data.draw(st.integers(1, new_size - 1))
    old_root = root_hash(hashes[:old_size])
    new_root = root_hash(hashes)
    path = consistency_path(hashes, old_size)

    verify_consistency(old_size, new_size, old_root, new_root, path)
    with pytest.raises(TransparencyError):
        verify_consistency(old_size, new_size, flip(old_root, data.draw(st.integers(0, HASH_SIZE - 1))), new_root, path)


def test_proof_generation_rejects_bad_positions():
    """Asking for a proof outside the tree raises ValueError naming the position."""
    hashes = hashes_of(make_leaves(4))

    with pytest.raises(ValueError, match="leaf index 4"):
        inclusion_path(hashes, 4)
    with pytest.raises(ValueError, match="old tree size 0"):
        consistency_path(hashes, 0)
    with pytest.raises(ValueError, match="old tree size 5"):
        consistency_path(hashes, 5)


# -- proofs on the wire ------------------------------------------------------------


def test_inclusion_proof_wire_round_trip():
    """An inclusion proof survives encoding and verifies a leaf against a tree head."""
    leaves = make_leaves(11)
    hashes = hashes_of(leaves)
    head = TreeHead(11, root_hash(hashes), 1_700_000_000)
    proof = InclusionProof(6, 11, tuple(inclusion_path(hashes, 6)))

    decoded = InclusionProof.from_wire(proof.to_wire())

    assert decoded == proof
    decoded.verify(leaves[6], head)
    with pytest.raises(TransparencyError):
        decoded.verify(leaves[5], head)
    with pytest.raises(TransparencyError, match="tree head has 12"):
        decoded.verify(leaves[6], TreeHead(12, head.root_hash, head.timestamp))


def test_consistency_proof_wire_round_trip():
    """A consistency proof survives encoding and verifies one tree head against another."""
    hashes = hashes_of(make_leaves(13))
    old_head = TreeHead(5, root_hash(hashes[:5]), 1_700_000_000)
    new_head = TreeHead(13, root_hash(hashes), 1_700_000_100)
    proof = ConsistencyProof(5, 13, tuple(consistency_path(hashes, 5)))

    decoded = ConsistencyProof.from_wire(proof.to_wire())

    assert decoded == proof
    decoded.verify(old_head, new_head)
    with pytest.raises(TransparencyError, match="sizes 5 to 13"):
        decoded.verify(TreeHead(6, old_head.root_hash, 0), new_head)


def test_proof_path_not_multiple_of_hash_size_rejected():
    """A path whose byte length is not a multiple of 32 fails to decode with that reason."""
    hashes = hashes_of(make_leaves(8))
    joined = b"".join(inclusion_path(hashes, 2))

    for path in (joined[:-1], joined + b"\x00", b"\x00" * 5):
        wire = encode({"v": 1, "type": "inclusion_proof", "leaf_index": 2, "tree_size": 8, "path": path})
        with pytest.raises(DecodeError, match="not a multiple of the 32-byte hash size") as caught:
            InclusionProof.from_wire(wire)
        assert caught.value.reason == "wrong_size"


def test_proof_path_wrong_hash_count_rejected():
    """A path with one hash too many or too few names the count that the position needs."""
    hashes = hashes_of(make_leaves(8))
    joined = b"".join(inclusion_path(hashes, 2))
    consistency = b"".join(consistency_path(hashes, 3))

    too_long = encode({"v": 1, "type": "inclusion_proof", "leaf_index": 2, "tree_size": 8, "path": joined + hashes[0]})
    with pytest.raises(DecodeError, match="has 4 hashes, but leaf 2 of a 8-leaf tree needs 3"):
        InclusionProof.from_wire(too_long)
    too_short = encode({"v": 1, "type": "consistency_proof", "old_size": 3, "new_size": 8, "path": consistency[:-HASH_SIZE]})
    with pytest.raises(DecodeError, match="from 3 to 8 leaves needs 4"):
        ConsistencyProof.from_wire(too_short)


def test_proof_positions_out_of_range_rejected():
    """A leaf index past the tree, an old size past the new one and size 0 fail to decode."""
    cases = [
        (InclusionProof.from_wire, {"v": 1, "type": "inclusion_proof", "leaf_index": 8, "tree_size": 8, "path": b""}),
        (InclusionProof.from_wire, {"v": 1, "type": "inclusion_proof", "leaf_index": 0, "tree_size": 0, "path": b""}),
        (ConsistencyProof.from_wire, {"v": 1, "type": "consistency_proof", "old_size": 9, "new_size": 8, "path": b""}),
        (ConsistencyProof.from_wire, {"v": 1, "type": "consistency_proof", "old_size": 0, "new_size": 8, "path": b""}),
    ]

    for decoder, fields in cases:
        with pytest.raises(DecodeError) as caught:
            decoder(encode(fields))
        assert caught.value.reason == "out_of_range", fields


def test_proof_wrong_type_or_version_rejected():
    """A proof of the other type or of another version fails to decode."""
    other_type = encode({"v": 1, "type": "consistency_proof", "leaf_index": 0, "tree_size": 1, "path": b""})
    newer = encode({"v": 2, "type": "inclusion_proof", "leaf_index": 0, "tree_size": 1, "path": b""})

    with pytest.raises(DecodeError) as caught:
        InclusionProof.from_wire(other_type)
    assert caught.value.reason == "unknown_value"
    with pytest.raises(DecodeError) as caught:
        InclusionProof.from_wire(newer)
    assert caught.value.reason == "unsupported_version"


# -- release records -----------------------------------------------------------------


def test_release_record_round_trip():
    """A release record encodes as a fixed-order array and decodes back unchanged."""
    record = ReleaseRecord(bytes(range(32)), "1.4.0", 1_700_000_000)

    leaf = record.to_leaf()

    assert leaf == encode(["confide-release", 1, bytes(range(32)), "1.4.0", 1_700_000_000])
    assert ReleaseRecord.from_leaf(leaf) == record
    assert record.leaf_hash() == leaf_hash(leaf)


def test_release_record_invalid_fields_rejected():
    """Construction rejects a short measurement, an empty or long version and a negative time."""
    with pytest.raises(ValueError, match="32 bytes"):
        ReleaseRecord(bytes(31), "1.0", 0)
    with pytest.raises(ValueError, match="non-empty"):
        ReleaseRecord(bytes(32), "", 0)
    with pytest.raises(ValueError, match="at most 64 bytes"):
        ReleaseRecord(bytes(32), "v" * 65, 0)
    with pytest.raises(ValueError, match="Unix seconds"):
        ReleaseRecord(bytes(32), "1.0", -1)


def test_release_leaf_malformed_rejected():
    """Leaves with a wrong tag, version, field or encoding fail to decode."""
    # The time 5 as a msgpack uint64: valid msgpack, but not the canonical encoding.
    uint64_time = b"\x95" + b"".join(encode(item) for item in ["confide-release", 1, bytes(32), "1.0"]) + b"\xcf" + (5).to_bytes(8, "big")
    cases = [
        encode(["confide-other", 1, bytes(32), "1.0", 5]),
        encode(["confide-release", 2, bytes(32), "1.0", 5]),
        encode(["confide-release", True, bytes(32), "1.0", 5]),
        encode(["confide-release", 1, bytes(33), "1.0", 5]),
        encode(["confide-release", 1, bytes(32), 1.0, 5]),
        encode(["confide-release", 1, bytes(32), "1.0"]),
        encode({"measurement": bytes(32)}),
        encode(["confide-release"]),
        encode(["confide-release", 1, bytes(32), "1.0", 5]) + b"\x00",
        uint64_time,
    ]

    for leaf in cases:
        with pytest.raises(DecodeError):
            ReleaseRecord.from_leaf(leaf)


# -- signed tree heads -------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_key() -> crypto.SigningKey:
    return crypto.SigningKey(bytes(range(32)))


def test_tree_head_signature_verifies(log_key):
    """A signed tree head verifies under the log key and returns the head."""
    head = TreeHead(7, root_hash(hashes_of(make_leaves(7))), 1_700_000_000)

    wire = sign_tree_head(head, log_key).to_wire()

    assert verify_tree_head(wire, log_key.verify_key) == head
    assert SignedTreeHead.from_wire(wire).head == head


def test_tree_head_tampered_rejected(log_key):
    """Changing the size, root, timestamp or signature of a signed tree head fails verification."""
    head = TreeHead(7, root_hash(hashes_of(make_leaves(7))), 1_700_000_000)
    signed = sign_tree_head(head, log_key)
    tampered = [
        SignedTreeHead(TreeHead(8, head.root_hash, head.timestamp), signed.signature),
        SignedTreeHead(TreeHead(7, flip(head.root_hash), head.timestamp), signed.signature),
        SignedTreeHead(TreeHead(7, head.root_hash, head.timestamp + 1), signed.signature),
        SignedTreeHead(head, flip(signed.signature, 10)),
    ]

    for candidate in tampered:
        with pytest.raises(TransparencyError, match="signature is invalid"):
            verify_tree_head(candidate.to_wire(), log_key.verify_key)


def test_tree_head_other_key_rejected(log_key):
    """A tree head signed by another key fails against the pinned key, and no key fails."""
    head = TreeHead(1, leaf_hash(b"x"), 1)
    wire = sign_tree_head(head, crypto.SigningKey(bytes(32))).to_wire()

    with pytest.raises(TransparencyError, match="signature is invalid"):
        verify_tree_head(wire, log_key.verify_key)
    with pytest.raises(TransparencyError, match="no log verify key"):
        verify_tree_head(wire, b"")


def test_tree_head_empty_tree_root_checked(log_key):
    """A signed head of size 0 must carry the empty-tree root."""
    good = sign_tree_head(TreeHead(0, EMPTY_ROOT, 1), log_key).to_wire()
    bad = sign_tree_head(TreeHead(0, leaf_hash(b"x"), 1), log_key).to_wire()

    assert verify_tree_head(good, log_key.verify_key).tree_size == 0
    with pytest.raises(TransparencyError, match="empty-tree root"):
        verify_tree_head(bad, log_key.verify_key)


def test_tree_head_malformed_rejected(log_key):
    """A tree head with a short root, a short signature or an extra field is malformed."""
    base = {"v": 1, "type": "tree_head", "tree_size": 1, "root_hash": bytes(32), "timestamp": 1, "sig": bytes(64)}
    cases = [
        {**base, "root_hash": bytes(31)},
        {**base, "sig": bytes(63)},
        {**base, "extra": 1},
        {**base, "tree_size": -1},
    ]

    for fields in cases:
        with pytest.raises(TransparencyError, match="malformed"):
            verify_tree_head(encode(fields), log_key.verify_key)
    with pytest.raises(TransparencyError, match="malformed"):
        verify_tree_head(b"", log_key.verify_key)
