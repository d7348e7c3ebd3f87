"""Pool key epochs: the current sealing key, the previous ones in their grace period, and erasure.

A new epoch starts every `rotate_every_s`. The key it replaces stays usable
for `grace_s` so jobs already queued under it can still be opened, then it
is erased. The ids of erased keys are remembered for `remember_s` (the jobs
stream's max age) so a job sealed to one is reported as "expired key"
rather than as an unknown key.
"""

from __future__ import annotations

from dataclasses import dataclass

from confide.schemas import crypto
from confide.schemas.codec import Fields, decode, encode
from confide.schemas.messages import KEY_ID_SIZE, MAX_DOCUMENT, key_id_for

MAX_EPOCHS = 64
MAX_RELEASED_ERASED = 4 * MAX_EPOCHS


@dataclass
class Epoch:
    keys: crypto.KeyPair
    created_at: int
    erase_at: int | None = None  # set when a newer epoch replaces this one

    @property
    def key_id(self) -> bytes:
        return key_id_for(self.keys.public)

    def __repr__(self) -> str:
        return f"Epoch(key_id={self.key_id.hex()}, created_at={self.created_at}, erase_at={self.erase_at})"


class EpochRing:
    """The epochs one worker holds, newest last."""

    def __init__(self, grace_s: int, remember_s: int) -> None:
        self.grace_s = grace_s
        self.remember_s = remember_s
        self._epochs: dict[bytes, Epoch] = {}
        self._current: bytes | None = None
        self._erased: dict[bytes, int] = {}  # key id -> when it was erased

    @property
    def current(self) -> Epoch | None:
        return self._epochs.get(self._current) if self._current is not None else None

    def keys_for(self, key_id: bytes) -> crypto.KeyPair | None:
        epoch = self._epochs.get(key_id)
        return epoch.keys if epoch is not None else None

    def is_erased(self, key_id: bytes) -> bool:
        return key_id in self._erased

    def install(self, epoch: Epoch, now: int, current: bool) -> None:
        """Add an epoch; as the current one, start the previous one's grace period."""
        if epoch.key_id in self._epochs or epoch.key_id in self._erased:
            return
        self._epochs[epoch.key_id] = epoch
        if not current:
            return

        previous = self.current
        if previous is not None and previous.erase_at is None:
            previous.erase_at = now + self.grace_s
        self._current = epoch.key_id

    def make_current(self, key_id: bytes, now: int) -> None:
        epoch = self._epochs[key_id]
        if self._current == key_id:
            return
        previous = self.current
        if previous is not None and previous.erase_at is None:
            previous.erase_at = now + self.grace_s
        epoch.erase_at = None
        self._current = key_id

    def expire(self, now: int) -> list[bytes]:
        """Erase epochs past their grace period; return their key ids."""
        erased = []
        for key_id, epoch in list(self._epochs.items()):
            if key_id != self._current and epoch.erase_at is not None and epoch.erase_at <= now:
                epoch.keys.erase()
                del self._epochs[key_id]
                self._erased[key_id] = now
                erased.append(key_id)
        for key_id, erased_at in list(self._erased.items()):
            if now - erased_at > self.remember_s:
                del self._erased[key_id]
        return erased

    def due_for_rotation(self, now: int, rotate_every_s: int) -> bool:
        current = self.current
        return current is not None and now - current.created_at >= rotate_every_s

    def to_release(self) -> bytes:
        """Serialise the live epochs' secrets, for sealing to an attested joiner.

        A release holds at most MAX_EPOCHS epochs and MAX_RELEASED_ERASED
        erased ids, the newest of each, because merge_release() accepts no
        more. Short epochs with a long grace or memory can exceed either:
        a joiner then cannot open jobs under the oldest live keys, and
        terminates a job under a forgotten erased key as unknown, not expired.
        """
        epochs = sorted(self._epochs.values(), key=lambda e: e.created_at)
        released = epochs[-MAX_EPOCHS:]
        current = self.current
        if current is not None and current not in released:
            released = [current, *released[1:]]
        newest_erased = sorted(self._erased, key=self._erased.__getitem__)[-MAX_RELEASED_ERASED:]
        return encode(
            {
                "current": self._current,
                "epochs": [{"secret": e.keys.secret, "created_at": e.created_at, "erase_at": e.erase_at} for e in released],
                "erased": sorted(newest_erased),
            }
        )

    def merge_release(self, data: bytes, now: int) -> None:
        """Install the epochs from a member's release; the caller already authenticated `data`."""
        fields = Fields(decode(data, MAX_DOCUMENT), "key_release.payload", {"current", "epochs", "erased"})
        current = fields.binary("current", size=KEY_ID_SIZE)
        for item in fields.array("epochs", MAX_EPOCHS):
            entry = Fields(item, "key_release.epoch", {"secret", "created_at", "erase_at"})
            erase_at = entry.raw("erase_at")
            epoch = Epoch(
                crypto.KeyPair(entry.binary("secret", size=crypto.KEY_SIZE)),
                entry.integer("created_at", 0, 2**40),
                entry.integer("erase_at", 0, 2**40) if erase_at is not None else None,
            )
            self.install(epoch, now, current=False)
        for key_id in fields.array("erased", MAX_RELEASED_ERASED):
            if isinstance(key_id, bytes) and len(key_id) == KEY_ID_SIZE and key_id not in self._epochs:
                self._erased.setdefault(key_id, now)
        if current in self._epochs:
            self.make_current(current, now)

    def erase(self) -> None:
        """Erase every key this ring holds, for a ring that is being dropped."""
        for epoch in self._epochs.values():
            epoch.keys.erase()
        self._epochs.clear()
        self._current = None

    def __len__(self) -> int:
        return len(self._epochs)

    def __repr__(self) -> str:
        return f"EpochRing(live={len(self._epochs)}, erased={len(self._erased)})"
