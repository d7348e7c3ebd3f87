"""Unit tests of the pool key epoch ring: rotation, grace, erasure and release."""

from __future__ import annotations

from confide.schemas import crypto
from confide.workers.epochs import MAX_EPOCHS, MAX_RELEASED_ERASED, Epoch, EpochRing


def new_epoch(created_at: int) -> Epoch:
    return Epoch(crypto.KeyPair.generate(), created_at)


def test_rotation_keeps_previous_key_for_grace():
    """The replaced key opens jobs until its grace period ends, then it is erased."""
    ring = EpochRing(grace_s=60, remember_s=3600)
    first = new_epoch(0)
    ring.install(first, now=0, current=True)
    second = new_epoch(100)
    ring.install(second, now=100, current=True)

    assert ring.current is second
    assert ring.keys_for(first.key_id) is first.keys
    assert ring.expire(now=159) == []
    assert ring.expire(now=160) == [first.key_id]
    assert ring.keys_for(first.key_id) is None
    assert ring.is_erased(first.key_id)
    assert first.keys.secret == bytes(32)


def test_erased_ids_forgotten_after_remember_window():
    ring = EpochRing(grace_s=0, remember_s=10)
    first = new_epoch(0)
    ring.install(first, now=0, current=True)
    ring.install(new_epoch(1), now=1, current=True)
    ring.expire(now=1)

    assert ring.is_erased(first.key_id)
    ring.expire(now=12)
    assert not ring.is_erased(first.key_id)


def test_current_epoch_never_erased():
    ring = EpochRing(grace_s=0, remember_s=10)
    only = new_epoch(0)
    ring.install(only, now=0, current=True)

    assert ring.expire(now=10**6) == []
    assert ring.keys_for(only.key_id) is only.keys


def test_due_for_rotation_by_current_age():
    ring = EpochRing(grace_s=60, remember_s=3600)
    ring.install(new_epoch(1000), now=1000, current=True)

    assert not ring.due_for_rotation(now=1099, rotate_every_s=100)
    assert ring.due_for_rotation(now=1100, rotate_every_s=100)


def test_release_round_trip_copies_every_live_epoch():
    """A joiner that merges a member's release holds the same keys, current and grace ones."""
    member = EpochRing(grace_s=60, remember_s=3600)
    old = new_epoch(0)
    member.install(old, now=0, current=True)
    erased = new_epoch(5)
    member.install(erased, now=5, current=True)
    current = new_epoch(10)
    member.install(current, now=10, current=True)
    member.expire(now=71)  # grace ends at 65 for `old` and at 70 for `erased`

    joiner = EpochRing(grace_s=60, remember_s=3600)
    joiner.merge_release(member.to_release(), now=71)

    assert joiner.current.key_id == current.key_id
    assert joiner.keys_for(current.key_id).secret == current.keys.secret
    assert joiner.is_erased(old.key_id)
    assert joiner.is_erased(erased.key_id)


def test_release_keeps_grace_deadline():
    member = EpochRing(grace_s=60, remember_s=3600)
    previous = new_epoch(0)
    member.install(previous, now=0, current=True)
    member.install(new_epoch(30), now=30, current=True)

    joiner = EpochRing(grace_s=999, remember_s=3600)
    joiner.merge_release(member.to_release(), now=40)

    assert joiner.keys_for(previous.key_id) is not None
    assert joiner.expire(now=90) == [previous.key_id]


def test_release_of_long_history_fits_and_merges():
    """A ring with more epochs and erased ids than a release holds sends the newest, and a joiner reads it."""
    ring = EpochRing(grace_s=0, remember_s=10**6)
    erased = []
    for index in range(MAX_RELEASED_ERASED + 40):
        epoch = new_epoch(index)
        ring.install(epoch, now=index, current=True)
        erased += ring.expire(now=index)
    ring.grace_s = 10**6  # from here on, replaced keys stay live
    for index in range(1000, 1000 + MAX_EPOCHS + 6):
        ring.install(new_epoch(index), now=index, current=True)
    joiner = EpochRing(grace_s=10**6, remember_s=10**6)

    joiner.merge_release(ring.to_release(), now=2000)

    assert len(ring) == MAX_EPOCHS + 7
    assert len(joiner) == MAX_EPOCHS
    assert joiner.current.key_id == ring.current.key_id
    assert all(joiner.is_erased(key_id) for key_id in erased[-MAX_RELEASED_ERASED:])
    assert not joiner.is_erased(erased[0])
