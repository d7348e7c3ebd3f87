"""A release transparency log: Merkle tree hashes, proofs and signed tree heads.

The tree follows RFC 6962 section 2.1 (restated in RFC 9162 section 2.1)
with SHA-256:

    leaf hash  = SHA-256(0x00 || leaf)
    node hash  = SHA-256(0x01 || left || right)
    MTH({})    = SHA-256()
    MTH(D[n])  = node hash of MTH(D[0:k]) and MTH(D[k:n]), where k is the
                 largest power of two smaller than n

Proofs are generated as RFC 6962 sections 2.1.1 (PATH) and 2.1.2 (PROOF)
define them and verified with the algorithms of RFC 9162 sections 2.1.3.2
and 2.1.4.2, step for step. A leaf is the msgpack encoding of one
ReleaseRecord: a release's 32-byte measurement, its version string and its
time. A tree head is signed with Ed25519 through schemas/crypto.py.

Where this differs from RFC 6962: leaves, proofs and tree heads are msgpack
rather than TLS structures, and timestamps are Unix seconds rather than
milliseconds. A consistency proof from the empty tree (old size 0) is
rejected, because it proves nothing about the newer tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from confide.errors import AuthenticationError, DecodeError, TransparencyError
from confide.schemas import crypto
from confide.schemas.codec import Fields, decode, encode

TRANSPARENCY_VERSION = 1

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()

MEASUREMENT_SIZE = 32
MAX_VERSION_STRING = 64
MAX_TIMESTAMP = 2**40
# A bound on the tree sizes that decoders accept, far above any release
# history, so that every proof has at most 2 * 40 hashes.
MAX_TREE_SIZE = 2**40
MAX_PROOF_HASHES = 2 * 40
MAX_LEAF = 256
MAX_TREE_HEAD_WIRE = 256
MAX_PROOF_WIRE = MAX_PROOF_HASHES * HASH_SIZE + 128

RELEASE_TAG = "confide-release"
TREE_HEAD_TAG = "confide-tree-head"


# -- hashing -------------------------------------------------------------------


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """Compute MTH over the leaves whose leaf hashes are given, for any tree size."""
    if not leaf_hashes:
        return EMPTY_ROOT

    return _subtree_root(leaf_hashes, 0, len(leaf_hashes))


def _split_point(size: int) -> int:
    """Return the largest power of two smaller than `size` (size >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def _subtree_root(leaf_hashes: Sequence[bytes], start: int, end: int) -> bytes:
    size = end - start
    if size == 1:
        return leaf_hashes[start]

    k = _split_point(size)
    return node_hash(_subtree_root(leaf_hashes, start, start + k), _subtree_root(leaf_hashes, start + k, end))


# -- proof generation (RFC 6962 sections 2.1.1 and 2.1.2) ----------------------


def inclusion_path(leaf_hashes: Sequence[bytes], leaf_index: int) -> list[bytes]:
    """Build PATH(leaf_index, D[n]) over the given leaf hashes, nearest sibling first."""
    if not 0 <= leaf_index < len(leaf_hashes):
        raise ValueError(f"leaf index {leaf_index} is outside a tree of {len(leaf_hashes)} leaves")

    siblings = []
    start, end = 0, len(leaf_hashes)
    while end - start > 1:
        k = _split_point(end - start)
        if leaf_index < start + k:
            siblings.append(_subtree_root(leaf_hashes, start + k, end))
            end = start + k
        else:
            siblings.append(_subtree_root(leaf_hashes, start, start + k))
            start = start + k
    # The walk went from the root down; PATH lists the leaf's sibling first.
    siblings.reverse()
    return siblings


def consistency_path(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Build PROOF(old_size, D[n]) over the given leaf hashes; empty when old_size == n."""
    if not 1 <= old_size <= len(leaf_hashes):
        raise ValueError(f"old tree size {old_size} must be between 1 and the tree size {len(leaf_hashes)}")

    return _subproof(leaf_hashes, old_size, 0, len(leaf_hashes), complete=True)


def _subproof(leaf_hashes: Sequence[bytes], m: int, start: int, end: int, complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[start:end], complete) of RFC 6962 section 2.1.2."""
    size = end - start
    if m == size:
        return [] if complete else [_subtree_root(leaf_hashes, start, end)]

    k = _split_point(size)
    if m <= k:
        return _subproof(leaf_hashes, m, start, start + k, complete) + [_subtree_root(leaf_hashes, start + k, end)]
    return _subproof(leaf_hashes, m - k, start + k, end, False) + [_subtree_root(leaf_hashes, start, start + k)]


def inclusion_path_length(leaf_index: int, tree_size: int) -> int:
    """Return how many hashes PATH(leaf_index, D[tree_size]) has."""
    if not 0 <= leaf_index < tree_size:
        raise ValueError(f"leaf index {leaf_index} is outside a tree of {tree_size} leaves")

    length = 0
    start, end = 0, tree_size
    while end - start > 1:
        k = _split_point(end - start)
        if leaf_index < start + k:
            end = start + k
        else:
            start = start + k
        length += 1
    return length


def consistency_path_length(old_size: int, new_size: int) -> int:
    """Return how many hashes PROOF(old_size, D[new_size]) has."""
    if not 1 <= old_size <= new_size:
        raise ValueError(f"old tree size {old_size} must be between 1 and the new size {new_size}")

    length = 0
    m, size, complete = old_size, new_size, True
    while m != size:
        k = _split_point(size)
        if m <= k:
            size = k
        else:
            m, size, complete = m - k, size - k, False
        length += 1
    return length if complete else length + 1


# -- proof verification (RFC 9162 sections 2.1.3.2 and 2.1.4.2) ----------------


def verify_inclusion(leaf_hash_value: bytes, leaf_index: int, tree_size: int, path: Sequence[bytes], root: bytes) -> None:
    """Check that a leaf hash sits at `leaf_index` of the tree with this size and root.

    Raises TransparencyError on any mismatch, including a path with too
    many or too few hashes.
    """
    _check_hash(leaf_hash_value, "leaf hash")
    _check_hash(root, "root hash")
    _check_path(path)
    if leaf_index < 0 or leaf_index >= tree_size:
        raise TransparencyError(f"leaf index {leaf_index} is outside a tree of {tree_size} leaves")

    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash_value
    for p in path:
        if sn == 0:
            raise TransparencyError(f"the inclusion proof has too many hashes ({len(path)}) for leaf {leaf_index} of a {tree_size}-leaf tree")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # On the right edge of an incomplete tree a level has no sibling,
            # so skip levels until fn is a right child again (or the root).
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1

    if sn != 0:
        raise TransparencyError(f"the inclusion proof has too few hashes ({len(path)}) for leaf {leaf_index} of a {tree_size}-leaf tree")
    if not crypto.constant_time_equal(r, root):
        raise TransparencyError(f"the inclusion proof for leaf {leaf_index} does not lead to the root hash of the {tree_size}-leaf tree")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]) -> None:
    """Check that the tree (new_size, new_root) extends the tree (old_size, old_root).

    Equal sizes need an empty path and equal roots. An old size of 0 is
    rejected: the empty tree is a prefix of every tree, so such a proof
    would compare nothing. Raises TransparencyError on any mismatch.
    """
    _check_hash(old_root, "old root hash")
    _check_hash(new_root, "new root hash")
    _check_path(path)
    if old_size < 1:
        raise TransparencyError("the old tree size is 0: an empty tree proves nothing about a newer tree, so there is nothing to verify")
    if old_size > new_size:
        raise TransparencyError(f"the old tree size {old_size} is larger than the new size {new_size}: a log never shrinks")
    if old_size == new_size:
        if path:
            raise TransparencyError(f"a consistency proof between two trees of {old_size} leaves must be empty, got {len(path)} hashes")
        if not crypto.constant_time_equal(old_root, new_root):
            raise TransparencyError(f"two tree heads of {old_size} leaves have different root hashes: the log has forked")
        return

    # Step 1.
    if not path:
        raise TransparencyError(f"the consistency proof from {old_size} to {new_size} leaves is empty")
    # Step 2: a power-of-two old tree is a complete subtree whose root the
    # proof leaves out, because the verifier already has it.
    nodes = list(path)
    if old_size & (old_size - 1) == 0:
        nodes.insert(0, old_root)
    # Steps 3 and 4.
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = nodes[0]
    # Step 6.
    for c in nodes[1:]:
        if sn == 0:
            raise TransparencyError(f"the consistency proof from {old_size} to {new_size} leaves has too many hashes ({len(path)})")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1

    # Step 7.
    if sn != 0:
        raise TransparencyError(f"the consistency proof from {old_size} to {new_size} leaves has too few hashes ({len(path)})")
    if not crypto.constant_time_equal(fr, old_root):
        raise TransparencyError(f"the consistency proof does not reproduce the old root hash of the {old_size}-leaf tree")
    if not crypto.constant_time_equal(sr, new_root):
        raise TransparencyError(f"the consistency proof does not reproduce the new root hash of the {new_size}-leaf tree")


def _check_hash(value: bytes, name: str) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes")
    if len(value) != HASH_SIZE:
        raise TransparencyError(f"the {name} is {len(value)} bytes, expected {HASH_SIZE}")


def _check_path(path: Sequence[bytes]) -> None:
    if len(path) > MAX_PROOF_HASHES:
        raise TransparencyError(f"the proof has {len(path)} hashes, more than the {MAX_PROOF_HASHES} any supported tree needs")
    for position, value in enumerate(path):
        _check_hash(value, f"proof hash {position}")


# -- leaves ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseRecord:
    """One release in the log: its measurement, version string and Unix time in seconds.

    The leaf is the fixed-order msgpack array
    ["confide-release", 1, measurement, version, time].
    """

    measurement: bytes
    version: str
    time: int

    def __post_init__(self) -> None:
        problem = _release_problem(self.measurement, self.version, self.time)
        if problem is not None:
            raise ValueError(problem)

    def to_leaf(self) -> bytes:
        return encode([RELEASE_TAG, TRANSPARENCY_VERSION, self.measurement, self.version, self.time])

    def leaf_hash(self) -> bytes:
        return leaf_hash(self.to_leaf())

    @classmethod
    def from_leaf(cls, data: bytes) -> ReleaseRecord:
        items = decode(data, MAX_LEAF)
        if not isinstance(items, list) or len(items) != 5:
            raise DecodeError("wrong_type", "a release leaf must be a msgpack array of 5 items")
        tag, version, measurement, release_version, time = items
        if tag != RELEASE_TAG:
            raise DecodeError("unknown_value", f"a release leaf must start with '{RELEASE_TAG}'")
        if isinstance(version, bool) or version != TRANSPARENCY_VERSION:
            raise DecodeError("unsupported_version", f"release leaf version {version!r} is not supported (this peer speaks {TRANSPARENCY_VERSION})")

        problem = _release_problem(measurement, release_version, time)
        if problem is not None:
            raise DecodeError("invalid_release", problem)
        record = cls(measurement, release_version, time)
        if record.to_leaf() != bytes(data):
            raise DecodeError("non_canonical", "the release leaf is not in canonical msgpack form")
        return record


def _release_problem(measurement: object, version: object, time: object) -> str | None:
    """Return why these release fields are invalid, or None when they are valid."""
    if not isinstance(measurement, bytes) or len(measurement) != MEASUREMENT_SIZE:
        return f"a release measurement must be {MEASUREMENT_SIZE} bytes"
    if not isinstance(version, str) or not version:
        return "a release version must be a non-empty string"
    if len(version.encode("utf-8", "surrogatepass")) > MAX_VERSION_STRING:
        return f"a release version must be at most {MAX_VERSION_STRING} bytes of UTF-8"
    if isinstance(time, bool) or not isinstance(time, int) or not 0 <= time <= MAX_TIMESTAMP:
        return f"a release time must be an integer number of Unix seconds in [0, {MAX_TIMESTAMP}]"
    return None


# -- tree heads ------------------------------------------------------------------


@dataclass(frozen=True)
class TreeHead:
    """The log's state at one moment: its size, its root hash and a Unix time in seconds."""

    tree_size: int
    root_hash: bytes
    timestamp: int

    def signed_bytes(self) -> bytes:
        """Return what the log key signs: a fixed-order msgpack array with a domain tag."""
        return encode([TREE_HEAD_TAG, TRANSPARENCY_VERSION, self.tree_size, self.root_hash, self.timestamp])


@dataclass(frozen=True, repr=False)
class SignedTreeHead:
    head: TreeHead
    signature: bytes

    def to_wire(self) -> bytes:
        return encode(
            {
                "v": TRANSPARENCY_VERSION,
                "type": "tree_head",
                "tree_size": self.head.tree_size,
                "root_hash": self.head.root_hash,
                "timestamp": self.head.timestamp,
                "sig": self.signature,
            }
        )

    @classmethod
    def from_wire(cls, data: bytes) -> SignedTreeHead:
        fields = Fields(
            decode(data, MAX_TREE_HEAD_WIRE),
            "tree_head",
            {"v", "type", "tree_size", "root_hash", "timestamp", "sig"},
            version=TRANSPARENCY_VERSION,
        )
        fields.string("type", choices=frozenset({"tree_head"}))
        head = TreeHead(
            tree_size=fields.integer("tree_size", 0, MAX_TREE_SIZE),
            root_hash=fields.binary("root_hash", size=HASH_SIZE),
            timestamp=fields.integer("timestamp", 0, MAX_TIMESTAMP),
        )
        return cls(head, fields.binary("sig", size=crypto.SIGNATURE_SIZE))

    def __repr__(self) -> str:
        return f"SignedTreeHead(tree_size={self.head.tree_size}, root_hash={self.head.root_hash.hex()[:16]}...)"


def sign_tree_head(head: TreeHead, log_key: crypto.SigningKey) -> SignedTreeHead:
    return SignedTreeHead(head, log_key.sign(head.signed_bytes()))


def verify_tree_head(unverified_wire: bytes, log_verify_key: bytes) -> TreeHead:
    """Decode a signed tree head and check its Ed25519 signature against the pinned log key.

    Raises TransparencyError when the encoding, the signature or the
    empty-tree root is wrong.
    """
    if not log_verify_key:
        raise TransparencyError("no log verify key is pinned, so no tree head can be verified")

    try:
        unverified = SignedTreeHead.from_wire(unverified_wire)
    except DecodeError as exc:
        raise TransparencyError(f"the signed tree head is malformed ({exc.reason}: {exc.detail})") from None
    try:
        crypto.verify_signature(log_verify_key, unverified.head.signed_bytes(), unverified.signature)
    except AuthenticationError:
        raise TransparencyError("the tree head signature is invalid for the pinned log key") from None
    head = unverified.head

    if head.tree_size == 0 and not crypto.constant_time_equal(head.root_hash, EMPTY_ROOT):
        raise TransparencyError("a tree head of size 0 must carry the empty-tree root SHA-256('')")
    return head


# -- proofs on the wire ------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class InclusionProof:
    """PATH(leaf_index, D[tree_size]) with the position it proves; path is nearest sibling first."""

    leaf_index: int
    tree_size: int
    path: tuple[bytes, ...]

    def verify(self, leaf: bytes, head: TreeHead) -> None:
        """Check that `leaf` (the leaf bytes, not their hash) is in the tree `head` describes."""
        if self.tree_size != head.tree_size:
            raise TransparencyError(f"the inclusion proof is for a tree of {self.tree_size} leaves but the tree head has {head.tree_size}")

        verify_inclusion(leaf_hash(leaf), self.leaf_index, self.tree_size, self.path, head.root_hash)

    def to_wire(self) -> bytes:
        return encode(
            {
                "v": TRANSPARENCY_VERSION,
                "type": "inclusion_proof",
                "leaf_index": self.leaf_index,
                "tree_size": self.tree_size,
                "path": b"".join(self.path),
            }
        )

    @classmethod
    def from_wire(cls, data: bytes) -> InclusionProof:
        fields = Fields(
            decode(data, MAX_PROOF_WIRE),
            "inclusion_proof",
            {"v", "type", "leaf_index", "tree_size", "path"},
            version=TRANSPARENCY_VERSION,
        )
        fields.string("type", choices=frozenset({"inclusion_proof"}))
        tree_size = fields.integer("tree_size", 1, MAX_TREE_SIZE)
        leaf_index = fields.integer("leaf_index", 0, tree_size - 1)
        path = _split_hashes(fields.binary("path", max_size=MAX_PROOF_HASHES * HASH_SIZE), "inclusion_proof.path")

        expected = inclusion_path_length(leaf_index, tree_size)
        if len(path) != expected:
            raise DecodeError(
                "wrong_size",
                f"inclusion_proof.path has {len(path)} hashes, but leaf {leaf_index} of a {tree_size}-leaf tree needs {expected}",
            )
        return cls(leaf_index, tree_size, path)

    def __repr__(self) -> str:
        return f"InclusionProof(leaf_index={self.leaf_index}, tree_size={self.tree_size}, path=[{len(self.path)} hashes])"


@dataclass(frozen=True, repr=False)
class ConsistencyProof:
    """PROOF(old_size, D[new_size]): evidence that the newer tree extends the older one."""

    old_size: int
    new_size: int
    path: tuple[bytes, ...]

    def verify(self, old_head: TreeHead, new_head: TreeHead) -> None:
        if (self.old_size, self.new_size) != (old_head.tree_size, new_head.tree_size):
            raise TransparencyError(
                f"the consistency proof is for sizes {self.old_size} to {self.new_size}, "
                f"but the tree heads have {old_head.tree_size} and {new_head.tree_size}"
            )

        verify_consistency(self.old_size, self.new_size, old_head.root_hash, new_head.root_hash, self.path)

    def to_wire(self) -> bytes:
        return encode(
            {
                "v": TRANSPARENCY_VERSION,
                "type": "consistency_proof",
                "old_size": self.old_size,
                "new_size": self.new_size,
                "path": b"".join(self.path),
            }
        )

    @classmethod
    def from_wire(cls, data: bytes) -> ConsistencyProof:
        fields = Fields(
            decode(data, MAX_PROOF_WIRE),
            "consistency_proof",
            {"v", "type", "old_size", "new_size", "path"},
            version=TRANSPARENCY_VERSION,
        )
        fields.string("type", choices=frozenset({"consistency_proof"}))
        new_size = fields.integer("new_size", 1, MAX_TREE_SIZE)
        old_size = fields.integer("old_size", 1, new_size)
        path = _split_hashes(fields.binary("path", max_size=MAX_PROOF_HASHES * HASH_SIZE), "consistency_proof.path")

        expected = consistency_path_length(old_size, new_size)
        if len(path) != expected:
            raise DecodeError(
                "wrong_size",
                f"consistency_proof.path has {len(path)} hashes, but a proof from {old_size} to {new_size} leaves needs {expected}",
            )
        return cls(old_size, new_size, path)

    def __repr__(self) -> str:
        return f"ConsistencyProof(old_size={self.old_size}, new_size={self.new_size}, path=[{len(self.path)} hashes])"


def _split_hashes(joined: bytes, name: str) -> tuple[bytes, ...]:
    if len(joined) % HASH_SIZE:
        raise DecodeError("wrong_size", f"{name} is {len(joined)} bytes, not a multiple of the {HASH_SIZE}-byte hash size")

    return tuple(joined[offset : offset + HASH_SIZE] for offset in range(0, len(joined), HASH_SIZE))
