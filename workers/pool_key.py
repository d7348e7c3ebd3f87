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
3. If no document exists, or no member answers, the worker creates a key
   and publishes its document with a revision check, so of two workers that
   race only one key survives and the other joins it.

A document that does not verify for the starting worker (another
measurement, for example) is replaced only when no member answers for it:
a running pool keeps its key, so a worker with other code or settings
cannot take the pool's jobs away from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
from confide.schemas.messages import AttestationBody, KeyRelease, key_id_for
from confide.workers.tee import TeeBackend

log = logging.getLogger("confide.worker.pool")

JOIN_TIMEOUT_S = 5.0
JOIN_ROUNDS = 5
REFUSAL = encode({"v": 1, "type": "key_release_refused"})


@dataclass
class PoolIdentity:
    tee: TeeBackend
    measurement: bytes
    model: str
    attestation_lifetime_s: int

    def member_policy(self, platform_key: bytes) -> TrustPolicy:
        """Accept joiners on our own platform root running exactly our measurement."""
        return TrustPolicy(
            platform_keys={self.tee.platform: platform_key},
            measurements=frozenset({self.measurement}),
            allow_simulated=self.tee.simulated,
            max_age_s=self.attestation_lifetime_s,
        )


class PoolKeyHolder:
    def __init__(self, nc: NATS, kv: KeyValue, identity: PoolIdentity, platform_verify_key: bytes) -> None:
        self._nc = nc
        self._kv = kv
        self._identity = identity
        self._policy = identity.member_policy(platform_verify_key)
        self.keys: crypto.KeyPair | None = None
        # Subscribed before the key's document is published, so a joiner
        # never finds a document that no member serves.
        self._subscription: Subscription | None = None

    def keys_for(self, key_id: bytes) -> crypto.KeyPair | None:
        if self.keys is None or not crypto.constant_time_equal(key_id, key_id_for(self.keys.public)):
            return None
        return self.keys

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
            # No member responded, so no running worker holds this document's key.
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
        join_document = self._identity.tee.attest(
            self._identity.measurement, "join", join_keys.public, self._identity.model, self._identity.attestation_lifetime_s
        )
        try:
            reply = await self._nc.request(subjects.KEY_RELEASE_SUBJECT, join_document.to_wire(), timeout=JOIN_TIMEOUT_S)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            log.info("no pool member responded to the key release request; the pool key will be replaced")
            return False

        try:
            secret = crypto.unseal(KeyRelease.from_wire(reply.data).sealed, join_keys)
        except (DecodeError, AuthenticationError):
            raise PoolJoinError(
                "a pool member rejected the key release request: this worker's measurement "
                f"({self._identity.measurement.hex()[:16]}...) or platform differs from the pool's; "
                "start it with the pool's code, model and --n-ctx, or stop the pool first"
            ) from None
        finally:
            join_keys.erase()
        keys = crypto.KeyPair(secret)
        if pool_public is None:
            keys.erase()
            raise PoolJoinError(
                "a pool member released the pool key, but the pool attestation document does not verify for this "
                "worker, so the key cannot be checked; see the log line above and start the worker again"
            )
        if not crypto.constant_time_equal(keys.public, pool_public):
            keys.erase()
            raise PoolJoinError("the released key does not match the pool's attested key; start the worker again")
        self._subscription = await self._subscribe()
        self.keys = keys
        return True

    async def _subscribe(self) -> Subscription:
        return await self._nc.subscribe(subjects.KEY_RELEASE_SUBJECT, queue="confide-pool")

    async def _create(self, revision: int | None) -> bool:
        keys = crypto.KeyPair.generate()
        document = self._attest(keys.public)
        self.keys = keys
        subscription = await self._subscribe()
        try:
            if revision is None:
                await self._kv.create(subjects.ATTESTATION_KEY, document)
            else:
                await self._kv.update(subjects.ATTESTATION_KEY, document, last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            # Another worker published its key first; join that one instead.
            await subscription.unsubscribe()
            self.keys = None
            keys.erase()
            return False
        self._subscription = subscription
        return True

    def _attest(self, pool_public: bytes) -> bytes:
        identity = self._identity
        return identity.tee.attest(identity.measurement, "pool", pool_public, identity.model, identity.attestation_lifetime_s).to_wire()

    async def refresh(self) -> None:
        assert self.keys is not None
        await self._kv.put(subjects.ATTESTATION_KEY, self._attest(self.keys.public))

    async def serve_key_release(self) -> None:
        """Respond to join requests until cancelled; call after join_or_create."""
        subscription = self._subscription
        assert subscription is not None and self.keys is not None
        try:
            async for message in subscription.messages:
                await message.respond(self._release(message.data))
        finally:
            with anyio.CancelScope(shield=True):
                await subscription.unsubscribe()

    def _release(self, unverified: bytes) -> bytes:
        if self.keys is None:
            return REFUSAL
        try:
            body = verify_document(unverified, self._policy, purpose="join")
        except AttestationError as exc:
            log.warning("key release refused: rejected a joining worker: %s", exc)
            return REFUSAL

        log.info("pool key released to a joining worker with key %s", crypto.fingerprint(body.key))
        return KeyRelease(crypto.seal(self.keys.secret, body.key)).to_wire()
