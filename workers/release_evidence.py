"""The worker's proof that it runs a logged release."""

from __future__ import annotations

from nats.js import JetStreamContext

from confide.schemas import crypto
from confide.schemas.messages import ReleaseEvidence
from confide.schemas.release_feed import evidence_for, read_log
from confide.schemas.transparency import ReleaseRecord


async def find_evidence(js: JetStreamContext, measurement: bytes, log_key: bytes) -> ReleaseEvidence | None:
    """Return the inclusion evidence for `measurement`, or None if the log does not list it.

    Raises TransparencyError when the log is missing or does not verify.
    """
    signed_head, _, leaves = await read_log(js, log_key)
    for index in reversed(range(len(leaves))):
        if crypto.constant_time_equal(ReleaseRecord.from_leaf(leaves[index]).measurement, measurement):
            return evidence_for(index, leaves, signed_head)
    return None
