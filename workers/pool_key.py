"""The pool's sealing key: created by the first worker, released to attested joiners.

Protocol (all over NATS, no secret ever in clear):
1. A starting worker reads the pool's attestation document from the pool
   bucket. If a fresh one exists, it sends a join document (its own
   attestation, purpose "join", binding a one-time X25519 key) on the key
   release subject.
2. A member verifies the join document against its own platform root and
   its own measurement, and responds with the pool's secret key sealed to the
   joiner's one-time key. A joiner that fails the check gets a refusal and
   the member logs the reason, never a key. A refused worker stops with
   PoolJoinError and leaves the pool's document as it is.
3. If no document exists, or no member responds, the worker creates a key
   and publishes its document with a revision check, so of two workers that
   race only one key survives and the other joins it.

A document that does not verify for the starting worker (another
measurement, for example) is replaced only when no member answers for it:
a running pool keeps its key, so a worker with other code or settings
cannot take the pool's jobs away from it.

Keys rotate in epochs (workers/epochs.py). Every member runs `maintain()`:
when the current epoch is due, members race to publish a new document with
a revision check; the winner's key becomes current, and the others fetch it
through the same key release. A member releases every live epoch, so a
joiner can also open jobs queued under the previous key.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, replace

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from confide.errors import AttestationError, AuthenticationError, DecodeError, PoolJoinError
from confide.schemas import crypto, subjects
from confide.schemas.attestation import TrustPolicy, verify_document
from confide.schemas.codec import encode
from confide.schemas.hardware import HardwareDocument
from confide.schemas.messages import AttestationBody, KeyRelease, ReleaseEvidence, SignedDocument, key_id_for
from confide.schemas.sev_snp import SnpTrustPolicy
from confide.workers.epochs import Epoch, EpochRing
from confide.workers.tee import TeeBackend

log = logging.getLogger("confide.worker.pool")

JOIN_TIMEOUT_S = 5.0
SYNC_INTERVAL_S = 1.0
JOIN_ROUNDS = 5
REFUSAL = encode({"v": 1, "type": "key_release_refused"})


@dataclass(frozen=True)
class PlatformRoots:
    """The roots pool members verify each other's documents against.

    `platform_keys` pins the simulated root's Ed25519 key; `sev_snp` pins
    AMD's root, the minimum TCB and the member's own launch measurement.
    """

    platform_keys: dict[str, bytes] = field(default_factory=dict)
    sev_snp: SnpTrustPolicy | None = None


@dataclass
class PoolIdentity:
    tee: TeeBackend
    measurement: bytes
    model: str
    attestation_lifetime_s: int
    dev_mode: bool = False
    release: ReleaseEvidence | None = None

    def member_policy(self, roots: PlatformRoots) -> TrustPolicy:
        """Accept joiners on our own platform root running exactly our measurement."""
        return TrustPolicy(
            platform_keys=roots.platform_keys,
            measurements=frozenset({self.measurement}),
            allow_simulated=self.tee.simulated,
            allow_dev=self.dev_mode,
            max_age_s=self.attestation_lifetime_s,
            sev_snp=roots.sev_snp,
        )


@dataclass(frozen=True)
class EpochSettings:
    rotate_every_s: int = 3600
    grace_s: int = 3600
    # Ids of erased keys are kept as long as a job sealed to one can be queued.
    remember_s: int = 24 * 3600
    check_every_s: float = 5.0
    refresh_every_s: float = 600.0


class PoolKeyHolder:
    def __init__(
        self,
        nc: NATS,
        kv: KeyValue,
        identity: PoolIdentity,
        member_policy: TrustPolicy,
        epochs: EpochSettings = EpochSettings(),
    ) -> None:
        self._nc = nc
        self._kv = kv
        self._identity = identity
        self._policy = member_policy
        self._settings = epochs
        self.ring = EpochRing(epochs.grace_s, epochs.remember_s)
        self._published_at = 0.0
        self._published_key_id: bytes | None = None
        self._synced_at = 0.0
        # Subscribed before the key's document is published, so a joiner
        # never finds a document that no member serves.
        self._subscription: Subscription | None = None

    @property
    def keys(self) -> crypto.KeyPair | None:
        """The current epoch's key pair."""
        current = self.ring.current
        return current.keys if current is not None else None

    def keys_for(self, key_id: bytes) -> crypto.KeyPair | None:
        return self.ring.keys_for(key_id)

    def is_erased(self, key_id: bytes) -> bool:
        return self.ring.is_erased(key_id)

    def is_published(self, key_id: bytes) -> bool:
        """Return whether `key_id` is the key the pool document named at the last check."""
        return self._published_key_id is not None and crypto.constant_time_equal(key_id, self._published_key_id)

    async def join_or_create(self) -> str:
        """Obtain the pool key; return "joined" or "created"."""
        for _ in range(JOIN_ROUNDS):
            entry = await self._current_entry()
            if entry is None:
                if await self._create(revision=None):
                    return "created"
                continue

            body = self._verify_pool_document(entry.value)
            if await self._join(body.key if body is not None else None):
                return "joined"
            # No member responded, so no running worker has this document's key.
            if await self._create(revision=entry.revision):
                return "created"
        raise PoolJoinError(f"could not join or create the pool key after {JOIN_ROUNDS} rounds; check the broker and start the worker again")

    async def _current_entry(self) -> KeyValue.Entry | None:
        try:
            entry = await self._kv.get(subjects.ATTESTATION_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry if entry.value else None

    def _verify_pool_document(self, unverified: bytes) -> AttestationBody | None:
        try:
            return verify_document(unverified, self._policy, purpose="pool")
        except AttestationError as exc:
            log.info("the pool attestation document does not verify for this worker: %s; it is replaced only if no pool member responds", exc)
            return None

    async def _join(self, pool_public: bytes | None) -> bool:
        """Request the pool key from a member; return False when no member responds.

        `pool_public` is the key of the pool document verified under this
        worker's policy, or None when that document did not verify. A key
        released against an unverified document is never used, because
        nothing shows that the member who sent it is attested.
        """
        join_keys = crypto.KeyPair.generate()
        identity = self._identity
        join_document = await anyio.to_thread.run_sync(
            identity.tee.attest, identity.measurement, "join", join_keys.public, identity.model, identity.attestation_lifetime_s
        )
        try:
            reply = await self._nc.request(subjects.KEY_RELEASE_SUBJECT, join_document.to_wire(), timeout=JOIN_TIMEOUT_S)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            log.info("no pool member responded to the key release request; the pool key will be replaced")
            return False

        try:
            payload = crypto.unseal(KeyRelease.from_wire(reply.data).sealed, join_keys)
        except (DecodeError, AuthenticationError):
            raise PoolJoinError(
                "a pool member rejected the key release request: this worker's measurement "
                f"({self._identity.measurement.hex()[:16]}...), platform or guest image differs from the pool's; "
                "start it with the pool's code, model and --n-ctx, or stop the pool first"
            ) from None
        finally:
            join_keys.erase()
        if pool_public is None:
            raise PoolJoinError(
                "a pool member released the pool key, but the pool attestation document does not verify for this "
                "worker, so the key cannot be checked; see the log line above and start the worker again"
            )
        now = int(time.time())
        # The responder is not authenticated; holding the secret of the
        # attested pool key is what shows it is a pool member. So the release
        # is checked in a scratch ring, and this worker's ring changes only
        # after the check.
        candidate = EpochRing(self.ring.grace_s, self.ring.remember_s)
        try:
            candidate.merge_release(payload, now)
        except (DecodeError, ValueError):
            raise PoolJoinError("a pool member sent an unreadable key release; start the worker again") from None
        wanted = key_id_for(pool_public)
        released = candidate.keys_for(wanted)
        if released is None or not crypto.constant_time_equal(released.public, pool_public):
            candidate.erase()
            raise PoolJoinError("the released keys do not include the pool's attested key; start the worker again")
        candidate.erase()
        self.ring.merge_release(payload, now)
        self.ring.make_current(wanted, now)
        if self._subscription is None:
            self._subscription = await self._subscribe()
        return True

    async def _subscribe(self) -> Subscription:
        return await self._nc.subscribe(subjects.KEY_RELEASE_SUBJECT, queue="confide-pool")

    async def _create(self, revision: int | None) -> bool:
        now = int(time.time())
        epoch = Epoch(crypto.KeyPair.generate(), now)
        document = await self._attest(epoch.keys.public)
        subscription = self._subscription or await self._subscribe()
        try:
            if revision is None:
                await self._kv.create(subjects.ATTESTATION_KEY, document)
            else:
                await self._kv.update(subjects.ATTESTATION_KEY, document, last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            # Another worker published its key first; join that one instead.
            if self._subscription is None:
                await subscription.unsubscribe()
            epoch.keys.erase()
            return False
        self.ring.install(epoch, now, current=True)
        self._subscription = subscription
        self._published_at = time.monotonic()
        return True

    async def _attest(self, pool_public: bytes) -> bytes:
        return await self._signed("pool", pool_public)

    async def attest_notice(self, subject_key: bytes) -> bytes:
        """Sign a notice that binds `subject_key` (a digest of a job envelope) to this worker."""
        return await self._signed("notice", subject_key)

    async def _signed(self, purpose: str, key: bytes) -> bytes:
        """Return a TEE document for `key`, with this worker's release log evidence attached."""
        identity = self._identity
        # In a thread: a hardware report is a request to the secure processor,
        # which can take long enough to stall the event loop.
        document = await anyio.to_thread.run_sync(
            functools.partial(
                identity.tee.attest,
                identity.measurement, purpose, key, identity.model, identity.attestation_lifetime_s, dev_mode=identity.dev_mode,
            )
        )
        if identity.release is not None:
            document = replace(document, release=identity.release)
        return document.to_wire()

    async def refresh(self) -> None:
        """Publish a fresh document for the current key, unless another key took its place."""
        entry = await self._current_entry()
        current = self.ring.current
        if current is None or entry is None:
            return
        published = _published_key_id(entry.value)
        if published is None or not crypto.constant_time_equal(published, current.key_id):
            return
        try:
            await self._kv.update(subjects.ATTESTATION_KEY, await self._attest(current.keys.public), last=entry.revision)
            self._published_at = time.monotonic()
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            pass

    async def maintain(self) -> None:
        """Follow, rotate, refresh and erase epochs until cancelled."""
        # Checking at least four times per epoch keeps a member from skipping
        # an epoch that another member created and then replaced.
        interval = min(self._settings.check_every_s, self._settings.rotate_every_s / 4)
        while True:
            await anyio.sleep(interval)
            try:
                await self._maintain_once()
            except (nats.errors.Error, PoolJoinError) as exc:
                log.warning("pool key maintenance failed: %s; retrying", exc if isinstance(exc, PoolJoinError) else type(exc).__name__)

    async def sync(self) -> None:
        """Catch up with the published epoch now; failures are logged and left to maintain().

        At most one sync a second, so a flood of jobs with bogus key ids
        costs the broker at most one bucket read a second.
        """
        if time.monotonic() - self._synced_at < SYNC_INTERVAL_S:
            return
        self._synced_at = time.monotonic()
        try:
            await self._maintain_once(rotate=False)
        except (nats.errors.Error, PoolJoinError) as exc:
            log.warning("pool key sync failed: %s", exc if isinstance(exc, PoolJoinError) else type(exc).__name__)

    async def _maintain_once(self, rotate: bool = True) -> None:
        now = int(time.time())
        entry = await self._current_entry()
        published = _published_key_id(entry.value) if entry is not None else None
        self._published_key_id = published
        current = self.ring.current

        if published is not None and current is not None and not crypto.constant_time_equal(published, current.key_id):
            if self.ring.keys_for(published) is not None:
                self.ring.make_current(published, now)
                log.info("pool key epoch %s is now current", published.hex())
            else:
                body = self._verify_pool_document(entry.value)
                if body is not None and await self._join(body.key):
                    log.info("obtained the new pool key epoch %s from a member", published.hex())
        elif rotate and entry is not None and self.ring.due_for_rotation(now, self._settings.rotate_every_s):
            previous = current.key_id.hex() if current is not None else "none"
            if await self._create(revision=entry.revision):
                log.info("rotated the pool key: epoch %s replaces %s", self.ring.current.key_id.hex(), previous)
        elif rotate and time.monotonic() - self._published_at >= self._settings.refresh_every_s:
            await self.refresh()

        for key_id in self.ring.expire(now):
            log.info("erased pool key epoch %s after its grace period", key_id.hex())

    async def serve_key_release(self) -> None:
        """Respond to join requests until cancelled; call after join_or_create."""
        subscription = self._subscription
        assert subscription is not None and self.ring.current is not None
        try:
            async for message in subscription.messages:
                await message.respond(self._release(message.data))
        finally:
            with anyio.CancelScope(shield=True):
                await subscription.unsubscribe()

    def _release(self, unverified: bytes) -> bytes:
        if self.ring.current is None:
            return REFUSAL
        try:
            body = verify_document(unverified, self._policy, purpose="join")
        except AttestationError as exc:
            log.warning("key release refused: rejected a joining worker: %s", exc)
            return REFUSAL

        log.info("pool key released to a joining worker with key %s (%d epochs)", crypto.fingerprint(body.key), len(self.ring))
        return KeyRelease(crypto.seal(self.ring.to_release(), body.key)).to_wire()


def _published_key_id(unverified: bytes) -> bytes | None:
    """Read the key id a pool document names, without trusting it: only for comparisons."""
    try:
        return AttestationBody.from_bytes(SignedDocument.from_wire(unverified).body).key_id
    except DecodeError:
        pass
    try:
        return HardwareDocument.from_wire(unverified).key_id
    except DecodeError:
        return None
