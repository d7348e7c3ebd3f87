"""Send N hostile jobs to a live worker, then check it survived and counted each one.

    python tests/fuzz_worker.py --count 100000 [--seed N]

runs tests/test_fuzz_worker.py with that count. Its fixtures start a
nats-server on a free loopback port and one worker (simulated TEE, the
default model), and the test publishes the inputs to the jobs subject. It
prints how many inputs of each kind it sent and how many the worker's stats
file counts under each rejection reason, and it fails unless the worker is
alive at the end and every input is counted as rejected. `make fuzz` runs
this; the default test suite runs the same test with 300 inputs.

The inputs are mutations of sealed jobs: bit flips, truncations, appended
bytes, fields of the wrong type or version, random bytes, replays, bad keys,
bad timestamps and oversized messages. Structure-aware mutations start from a
job whose last message has role "assistant", so a mutation that happens to
decode still ends in a rejection and never costs a generation.
"""

from __future__ import annotations

import argparse
import json
import random
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats

from confide.clients.client import Client
from confide.errors import DecodeError
from confide.schemas import crypto, subjects
from confide.schemas.attestation import TrustPolicy
from confide.schemas.codec import encode
from confide.schemas.messages import MAX_JOB_ENVELOPE, PAD_BUCKETS, ChatMessage, GenerationParams, JobRequest
from hostile_jobs import BuiltJob, JobFactory, current_timestamp, envelope_map, pad_job, payload_map

DAY_S = 24 * 3600
# The fuzzer pauses while more jobs than this wait in the consumer, so the
# jobs stream stays far below its byte limit however many inputs are sent.
MAX_QUEUED_JOBS = 2000
QUEUE_CHECK_INTERVAL = 256
STATS_WAIT_S = 120.0
# How main() passes the count and seed to the test it runs.
COUNT_VARIABLE = "CONFIDE_FUZZ_COUNT"
SEED_VARIABLE = "CONFIDE_FUZZ_SEED"
PAYLOAD_HEAD = 256
# u-coordinates of small-order Curve25519 points: X25519 with any of them gives zero.
LOW_ORDER_POINTS = (
    bytes(32),
    (1).to_bytes(32, "little"),
    (2**255 - 20).to_bytes(32, "little"),
    (325606250916557431795983626356110631294008115727848805560023387167927233504).to_bytes(32, "little"),
)


# -- input generation -----------------------------------------------------------------


class Mutator:
    """Produces hostile inputs of weighted kinds from a valid sealed job and freshly built rejected ones."""

    def __init__(self, factory: JobFactory, rng: random.Random, valid: BuiltJob) -> None:
        self._factory = factory
        self._rng = rng
        self._valid = valid
        self._kinds: dict[str, tuple[float, Callable[[], bytes]]] = {
            "bit_flips": (20, self.bit_flips),
            "truncation": (10, self.truncation),
            "appended_bytes": (4, self.appended_bytes),
            "random_bytes": (10, self.random_bytes),
            "envelope_field_changed": (10, self.envelope_field_changed),
            "envelope_wrong_version": (2, self.envelope_wrong_version),
            "wrong_key_id": (4, self.wrong_key_id),
            "unsealable": (4, self.unsealable),
            "payload_bit_flips": (10, self.payload_bit_flips),
            "payload_field_changed": (10, self.payload_field_changed),
            "payload_wrong_version": (2, self.payload_wrong_version),
            "replay": (6, self.replay),
            "bad_timestamp": (3, self.bad_timestamp),
            "low_order_client_key": (1, self.low_order_client_key),
            "oversized": (0.2, self.oversized),
        }

    def _rejected_request(self) -> JobRequest:
        """Return the base of a structure-aware mutation, with fresh ids so it is never a replay.

        It decodes, but the worker rejects it as invalid_messages because the
        last message is not the user's.
        """
        request, _ = self._factory.request((ChatMessage("user", "Hello."), ChatMessage("assistant", "Hi there.")), max_tokens=1)
        return request

    def _rejected_envelope(self) -> dict[str, Any]:
        return envelope_map(self._factory.seal_padded(self._rejected_request().to_padded()))

    def next(self) -> tuple[str, bytes]:
        """Return the kind and bytes of one hostile input."""
        names = list(self._kinds)
        kind = self._rng.choices(names, weights=[self._kinds[name][0] for name in names])[0]
        return kind, self._kinds[kind][1]()

    def _flip_bits(self, data: bytes, end: int | None = None) -> bytes:
        """Flip one random bit in each of one to eight distinct bytes among the first `end`.

        Distinct bytes keep two flips from cancelling out, which would turn
        the input into an unchanged copy, that is a replay.
        """
        changed = bytearray(data)
        span = min(end or len(changed), len(changed))
        for position in self._rng.sample(range(span), min(span, self._rng.randint(1, 8))):
            changed[position] ^= 1 << self._rng.randrange(8)
        return bytes(changed)

    def _random_value(self, depth: int = 0) -> Any:
        """Return a random msgpack value of any type, nested at most two levels."""
        rng = self._rng
        choice = rng.randrange(9 if depth < 2 else 7)
        if choice == 0:
            return None
        if choice == 1:
            return rng.random() < 0.5
        if choice == 2:
            return rng.choice([0, 1, 2, -1, 2**31, 2**40 + 1, 2**64 - 1, -(2**63), rng.randrange(-(2**63), 2**64)])
        if choice == 3:
            return rng.choice([0.0, -0.0, 0.5, 2.5, float("nan"), float("inf"), float("-inf"), rng.uniform(-1e9, 1e9)])
        if choice == 4:
            return rng.choice(["", "job", "user", "v", "नमस्ते", "x" * rng.randrange(300)])
        if choice == 5:
            return rng.randbytes(rng.choice([0, 1, 7, 8, 9, 16, 31, 32, 33, 64, 1072]))
        if choice == 6:
            return rng.randbytes(rng.randrange(40))
        if choice == 7:
            return [self._random_value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["v", "type", "role", "content", "x"]): self._random_value(depth + 1) for _ in range(rng.randrange(4))}

    def _change_field(self, value: dict[str, Any]) -> dict[str, Any]:
        """Replace, remove or add one field at any depth of a msgpack map."""
        rng = self._rng
        parent: Any = value
        key: Any = rng.choice(list(value))
        while isinstance(parent[key], (dict, list)) and parent[key] and rng.random() < 0.6:
            parent = parent[key]
            key = rng.choice(list(parent)) if isinstance(parent, dict) else rng.randrange(len(parent))
        action = rng.randrange(3)
        if action == 0 and isinstance(parent, dict):
            del parent[key]
        elif action == 1 and isinstance(parent, dict):
            parent[rng.choice(["extra", "V", "ts2", ""])] = self._random_value()
        else:
            parent[key] = self._random_value()
        return value

    def bit_flips(self) -> bytes:
        return self._flip_bits(self._valid.wire)

    def truncation(self) -> bytes:
        return self._valid.wire[: self._rng.randrange(len(self._valid.wire))]

    def appended_bytes(self) -> bytes:
        return self._valid.wire + self._rng.randbytes(self._rng.randint(1, 32))

    def random_bytes(self) -> bytes:
        return self._rng.randbytes(self._rng.choice([0, 1, 2, 16, 100, 1072, 2096, self._rng.randrange(4096)]))

    def envelope_field_changed(self) -> bytes:
        return encode(self._change_field(self._rejected_envelope()))

    def envelope_wrong_version(self) -> bytes:
        return encode({**self._rejected_envelope(), "v": self._rng.choice([0, 2, 3, 255, 2**32])})

    def wrong_key_id(self) -> bytes:
        return encode({**self._rejected_envelope(), "key_id": self._rng.randbytes(8)})

    def unsealable(self) -> bytes:
        bucket = self._rng.choice(PAD_BUCKETS[:3])
        return encode({**self._rejected_envelope(), "sealed": self._rng.randbytes(bucket + crypto.SEAL_OVERHEAD)})

    def payload_bit_flips(self) -> bytes:
        # Half the flips land in the msgpack bytes and the padding marker, which
        # take the first few hundred bytes; the rest anywhere in the bucket.
        padded = self._rejected_request().to_padded()
        end = PAYLOAD_HEAD if self._rng.random() < 0.5 else None
        return self._factory.seal_padded(self._flip_bits(padded, end))

    def payload_field_changed(self) -> bytes:
        # A changed field can make the base valid, for example a role changed
        # to "user": such a job would run, so it is drawn again.
        while True:
            payload = self._change_field(payload_map(self._rejected_request()))
            if not possibly_runnable(payload):
                return self._factory.seal_payload_map(payload)

    def payload_wrong_version(self) -> bytes:
        return self._factory.seal_payload_map({**payload_map(self._rejected_request()), "v": self._rng.choice([0, 2, 2**16])})

    def replay(self) -> bytes:
        return self._valid.wire

    def bad_timestamp(self) -> bytes:
        offset = self._rng.choice([-2 * DAY_S, -400 * DAY_S, 3600, 30 * DAY_S])
        return self._factory.job(timestamp=max(0, current_timestamp() + offset), max_tokens=1).wire

    def low_order_client_key(self) -> bytes:
        return self._factory.job(client_key=self._rng.choice(LOW_ORDER_POINTS), max_tokens=1).wire

    def oversized(self) -> bytes:
        return self._rng.randbytes(self._rng.randint(MAX_JOB_ENVELOPE + 1, MAX_JOB_ENVELOPE + 64 * 1024))


def possibly_runnable(payload: Any) -> bool:
    """Return whether a payload decodes to a job whose last message is the user's, which a worker may run."""
    try:
        request = JobRequest.from_padded(pad_job(encode(payload)))
    except (DecodeError, ValueError):
        return False
    return request.messages[-1].role == "user"


# -- the run ------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    sent: Counter[str]
    rejections: Counter[str]
    outcomes: Counter[str]
    worker_alive: bool
    elapsed_s: float

    @property
    def count(self) -> int:
        return sum(self.sent.values())

    @property
    def every_input_rejected(self) -> bool:
        return sum(self.rejections.values()) == self.count

    def render(self) -> str:
        lines = [f"sent {self.count} hostile inputs in {self.elapsed_s:.0f} s", "", "inputs by kind:"]
        lines += [f"  {kind:<28} {number:>8}" for kind, number in sorted(self.sent.items())]
        lines += ["", "rejections counted by the worker, by reason:"]
        lines += [f"  {reason:<28} {number:>8}" for reason, number in sorted(self.rejections.items())]
        lines += [
            f"  {'total':<28} {sum(self.rejections.values()):>8}",
            "",
            f"other outcomes: {dict(sorted(self.outcomes.items())) or 'none'}",
            f"worker alive: {'yes' if self.worker_alive else 'NO'}",
            f"every input rejected with a counted reason: {'yes' if self.every_input_rejected else 'NO'}",
        ]
        return "\n".join(lines)


def read_stats(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def difference(after: dict[str, int], before: dict[str, int]) -> Counter[str]:
    return Counter({name: after.get(name, 0) - before.get(name, 0) for name in after if after.get(name, 0) != before.get(name, 0)})


async def wait_for_stats_write(path: Path) -> dict:
    """Wait until the worker rewrites its stats file, then return the counters."""
    modified = path.stat().st_mtime_ns
    deadline = time.monotonic() + STATS_WAIT_S
    while path.stat().st_mtime_ns == modified and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    return read_stats(path)


async def wait_for_counts(path: Path, before: dict, rejected: int, completed: int) -> dict:
    """Wait until the stats file counts the new rejections and completions, or return what it has at the deadline."""
    deadline = time.monotonic() + STATS_WAIT_S
    while True:
        stats = read_stats(path)
        counted_rejected = sum(difference(stats["rejections"], before["rejections"]).values())
        counted_completed = difference(stats["outcomes"], before["outcomes"])["completed"]
        if (counted_rejected >= rejected and counted_completed >= completed) or time.monotonic() > deadline:
            return stats
        await anyio.sleep(0.2)


async def wait_while_queue_full(js) -> None:
    while True:
        info = await js.consumer_info(subjects.JOBS_STREAM, subjects.WORKERS_CONSUMER)
        if info.num_pending + info.num_ack_pending <= MAX_QUEUED_JOBS:
            return
        await anyio.sleep(0.05)


async def fuzz(url: str, policy: TrustPolicy, stats_path: Path, count: int, seed: int, worker_alive: Callable[[], bool]) -> FuzzReport:
    """Publish `count` hostile inputs to a live worker and report how it counted them.

    A valid job goes first so that replays of it are rejected as "replayed".
    A normal job goes last. The worker takes jobs one at a time in stream
    order, so that job's reply means every input before it was handled.
    """
    rng = random.Random(seed)
    sent: Counter[str] = Counter()
    started = time.monotonic()
    async with await Client.connect(url, policy, reply_timeout_s=300) as client:
        attested = await client.attest()
        factory = JobFactory(attested.key, attested.key_id)
        valid = factory.job(max_tokens=1)
        mutator = Mutator(factory, rng, valid)
        before = await wait_for_stats_write(stats_path)

        publisher = await nats.connect(url)
        try:
            js = publisher.jetstream()
            await js.publish(subjects.JOBS_SUBJECT, valid.wire, stream=subjects.JOBS_STREAM)
            for number in range(count):
                if number % QUEUE_CHECK_INTERVAL == 0:
                    await wait_while_queue_full(js)
                kind, data = mutator.next()
                await js.publish(subjects.JOBS_SUBJECT, data, stream=subjects.JOBS_STREAM)
                sent[kind] += 1
        finally:
            await publisher.close()

        await client.ask_text([ChatMessage("user", "Name one colour.")], GenerationParams(max_tokens=1, temperature=0.0))
        # The valid job and the normal job complete, and every other input is rejected.
        after = await wait_for_counts(stats_path, before, rejected=count, completed=2)

    return FuzzReport(
        sent=sent,
        rejections=difference(after["rejections"], before["rejections"]),
        outcomes=difference({k: v for k, v in after["outcomes"].items() if k != "rejected"}, before["outcomes"]),
        worker_alive=worker_alive(),
        elapsed_s=time.monotonic() - started,
    )


# -- command line -----------------------------------------------------------------------------


def main() -> None:
    """Run the fuzz test with the requested count and seed.

    The test's fixtures start the nats-server and the worker, the same way
    as for the rest of the suite, so the runner needs no setup of its own.
    """
    parser = argparse.ArgumentParser(description="Send hostile jobs to a live confide worker and report its rejections.")
    parser.add_argument("--count", type=int, default=100_000, help="number of hostile inputs to send (default: 100000)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the input generator (default: random, printed)")
    arguments = parser.parse_args()
    if arguments.count < 1:
        parser.error("--count must be at least 1")
    seed = arguments.seed if arguments.seed is not None else random.SystemRandom().randrange(2**32)

    environment = {**os.environ, COUNT_VARIABLE: str(arguments.count), SEED_VARIABLE: str(seed)}
    test_file = Path(__file__).with_name("test_fuzz_worker.py")
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(test_file)]
    sys.exit(subprocess.run(command, env=environment, check=False).returncode)


if __name__ == "__main__":
    main()
