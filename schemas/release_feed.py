"""The release transparency log as published on the broker, and its readers.

The log's operator publishes to the key-value bucket `confide_log`:

    tree_head       the latest signed tree head (schemas/transparency.py wire form)
    leaf.<index>    each release record's leaf bytes, index from 0

Workers read it to prove their measurement is a release. Clients read it to
check that each tree head they see is consistent with the last one they
stored. Nothing read from the bucket is trusted until a signature or a proof
checks it.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType

from confide.errors import TransparencyError
from confide.schemas.messages import ReleaseEvidence
from confide.schemas.transparency import (
    ConsistencyProof,
    InclusionProof,
    SignedTreeHead,
    TreeHead,
    consistency_path,
    inclusion_path,
    leaf_hash,
    root_hash,
    verify_tree_head,
)

LOG_BUCKET = "confide_log"
TREE_HEAD_KEY = "tree_head"
MAX_LEAVES = 100_000


def leaf_key(index: int) -> str:
    return f"leaf.{index}"


async def publish_log(js: JetStreamContext, leaves: list[bytes], tree_head: SignedTreeHead) -> None:
    """Publish leaves (only new ones are written) and then the tree head that covers them."""
    kv = await js.create_key_value(KeyValueConfig(bucket=LOG_BUCKET, history=1, storage=StorageType.FILE))
    for index, leaf in enumerate(leaves):
        try:
            entry = await kv.get(leaf_key(index))
            if entry.value == leaf:
                continue
        except nats.js.errors.KeyNotFoundError:
            pass
        await kv.put(leaf_key(index), leaf)
    await kv.put(TREE_HEAD_KEY, tree_head.to_wire())


async def read_log(js: JetStreamContext, log_verify_key: bytes) -> tuple[SignedTreeHead, TreeHead, list[bytes]]:
    """Fetch the signed tree head and every leaf it covers; check the leaves against its root."""
    try:
        kv = await js.key_value(LOG_BUCKET)
        wire = (await kv.get(TREE_HEAD_KEY)).value
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError, nats.js.errors.NotFoundError):
        raise TransparencyError("the release log was not found on the broker: publish one with 'confide release'") from None
    except nats.errors.Error as exc:
        raise TransparencyError(f"reading the release log failed: {type(exc).__name__}") from None

    head = verify_tree_head(wire, log_verify_key)
    if head.tree_size > MAX_LEAVES:
        raise TransparencyError(f"the release log claims {head.tree_size} leaves, more than the {MAX_LEAVES} this reader fetches")
    leaves = []
    for index in range(head.tree_size):
        try:
            leaves.append((await kv.get(leaf_key(index))).value)
        except nats.js.errors.KeyNotFoundError:
            raise TransparencyError(f"the release log lacks leaf {index} of {head.tree_size}") from None
    if root_hash([leaf_hash(leaf) for leaf in leaves]) != head.root_hash:
        raise TransparencyError("the published leaves do not match the signed tree head's root")
    return SignedTreeHead.from_wire(wire), head, leaves


def evidence_for(measurement_leaf_index: int, leaves: list[bytes], signed_head: SignedTreeHead) -> ReleaseEvidence:
    hashes = [leaf_hash(leaf) for leaf in leaves]
    proof = InclusionProof(measurement_leaf_index, len(leaves), tuple(inclusion_path(hashes, measurement_leaf_index)))
    return ReleaseEvidence(leaves[measurement_leaf_index], proof.to_wire(), signed_head.to_wire())


def consistency_between(leaves: list[bytes], old_size: int) -> ConsistencyProof:
    hashes = [leaf_hash(leaf) for leaf in leaves]
    return ConsistencyProof(old_size, len(leaves), tuple(consistency_path(hashes, old_size)))
