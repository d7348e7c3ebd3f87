"""Faults on real processes: a worker killed or stopped mid-reply, the broker restarted mid-reply.

Each test starts its own nats-server (a fresh store directory and port) and
its own workers, then kills or restarts one of them while a greedy reply
streams. The client must end with exactly the reply llama.cpp gives
directly, whatever attempt delivered it.
"""

from __future__ import annotations

import re
import signal
import threading

import anyio
import pytest

from conftest import WorkerProcess, start_broker, start_worker, stop
from confide.clients.client import Client, PendingJob, ReplyEvent
from confide.schemas import subjects
from confide.schemas.messages import ChatMessage, GenerationParams, ReplyChunk

pytestmark = pytest.mark.anyio

# Greedy, so every attempt produces the same text. The reply only has to
# outlast the kill or restart that follows its first chunk.
LONG = GenerationParams(max_tokens=200, temperature=0.0)
MESSAGES = [ChatMessage("user", "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle during a winter storm.")]
# Generous deadlines for two busy cores. Every wait ends as soon as its condition holds.
WAIT_S = 300
REPLY_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def expected_reply(local_engine) -> str:
    """Return the reply that llama.cpp gives directly for MESSAGES under LONG."""
    pieces: list[str] = []
    local_engine.generate(local_engine.prompt_tokens(MESSAGES), LONG, pieces.append, threading.Event())
    return "".join(pieces)


@pytest.fixture
def running():
    """Collect the processes a test starts and stop them in reverse order when it ends, pass or fail."""
    processes = []
    yield processes
    for process in reversed(processes):
        stop(process)


class ReplyRecorder:
    """A wrapper around a client's `replies` that records each event and the job it belongs to."""

    def __init__(self, client: Client) -> None:
        self.job: PendingJob | None = None
        self.events: list[ReplyEvent] = []
        self.first_text = anyio.Event()
        original = client.replies

        async def recording_replies(job: PendingJob, *args, **kwargs):
            self.job = job
            async for event in original(job, *args, **kwargs):
                self.events.append(event)
                if event.text:
                    self.first_text.set()
                yield event

        client.replies = recording_replies


async def ask_while(client: Client, recorder: ReplyRecorder, fault) -> str:
    """Run `client.ask_text`, call `fault()` once the first reply text arrives, and return the reply."""
    reply: list[str] = []

    async def ask() -> None:
        reply.append(await client.ask_text(MESSAGES, LONG))

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as group:
            group.start_soon(ask)
            await recorder.first_text.wait()
            await fault()
    return reply[0]


async def wait_for_log(workers: list[WorkerProcess], pattern: str) -> WorkerProcess:
    """Return the first worker whose log has a line matching `pattern`."""
    with anyio.fail_after(WAIT_S):
        while True:
            for worker in workers:
                if re.search(pattern.encode(), worker.output()):
                    return worker
            await anyio.sleep(0.05)


async def stored_chunks(client: Client, job: PendingJob) -> list[ReplyChunk]:
    """Return every chunk stored under the job's reply subject, in stream order."""
    js = client._nc.jetstream()
    total = (await js.stream_info(subjects.REPLIES_STREAM, subjects_filter=job.reply_subject)).state.subjects[job.reply_subject]
    subscription = await js.subscribe(job.reply_subject, stream=subjects.REPLIES_STREAM, ordered_consumer=True)
    try:
        return [ReplyChunk.from_wire((await subscription.next_msg(timeout=30)).data) for _ in range(total)]
    finally:
        await subscription.unsubscribe()


def attempts_of(chunks: list[ReplyChunk]) -> dict[int, list[ReplyChunk]]:
    by_attempt: dict[int, list[ReplyChunk]] = {}
    for chunk in chunks:
        by_attempt.setdefault(chunk.attempt, []).append(chunk)
    return by_attempt


def start_pair(broker_url: str, pool, tmp_path, ack_wait_s: int) -> list[WorkerProcess]:
    return [
        start_worker(broker_url, pool, tmp_path, name, extra=["--ack-wait", str(ack_wait_s)], verbose=True)
        for name in ("first", "second")
    ]


async def test_worker_killed_mid_reply_job_redelivered(expected_reply, pool, tmp_path, running):
    """After SIGKILL of the worker mid-reply, the other worker reruns the job under a new key once the ack wait passes."""
    broker = start_broker(tmp_path / "broker")
    running.append(broker.process)
    workers = start_pair(broker.url, pool, tmp_path, ack_wait_s=3)
    running.extend(worker.process for worker in workers)

    async with await Client.connect(broker.url, pool.policy, reply_timeout_s=REPLY_TIMEOUT_S) as client:
        recorder = ReplyRecorder(client)
        killed: list[WorkerProcess] = []

        async def kill_the_running_worker() -> None:
            holder = await wait_for_log(workers, r"job started seq=1 attempt=1 ")
            holder.process.send_signal(signal.SIGKILL)
            holder.process.wait()
            killed.append(holder)

        reply = await ask_while(client, recorder, kill_the_running_worker)
        chunks = await stored_chunks(client, recorder.job)

    survivor = next(worker for worker in workers if worker is not killed[0])
    assert killed[0].process.returncode == -signal.SIGKILL
    assert re.search(rb"job completed seq=1 attempt=2 ", survivor.output())
    assert reply == expected_reply
    assert sum(event.restarted for event in recorder.events) == 1
    assert recorder.events[-1].final

    by_attempt = attempts_of(chunks)
    assert sorted(by_attempt) == [1, 2]
    assert not any(chunk.final for chunk in by_attempt[1])
    assert by_attempt[2][-1].final
    assert [chunk.index for chunk in by_attempt[2]] == list(range(len(by_attempt[2])))
    assert {chunk.worker_key for chunk in by_attempt[1]} != {chunk.worker_key for chunk in by_attempt[2]}
    assert len({chunk.worker_key for chunk in by_attempt[2]}) == 1


async def test_worker_stopped_mid_reply_hands_job_back(expected_reply, pool, tmp_path, running):
    """After SIGTERM mid-reply the worker naks the job, so the other worker reruns it long before the ack wait."""
    broker = start_broker(tmp_path / "broker")
    running.append(broker.process)
    # An hour: only the nak can bring the job back within the test's deadlines.
    workers = start_pair(broker.url, pool, tmp_path, ack_wait_s=3600)
    running.extend(worker.process for worker in workers)

    async with await Client.connect(broker.url, pool.policy, reply_timeout_s=REPLY_TIMEOUT_S) as client:
        recorder = ReplyRecorder(client)
        stopped: list[WorkerProcess] = []

        async def stop_the_running_worker() -> None:
            holder = await wait_for_log(workers, r"job started seq=1 attempt=1 ")
            holder.process.send_signal(signal.SIGTERM)
            stopped.append(holder)

        reply = await ask_while(client, recorder, stop_the_running_worker)
        chunks = await stored_chunks(client, recorder.job)

    survivor = next(worker for worker in workers if worker is not stopped[0])
    assert stopped[0].process.wait(WAIT_S) == 0
    assert b"job handed back for redelivery seq=1 attempt=1" in stopped[0].output()
    assert b"job completed seq=1" not in stopped[0].output()
    assert re.search(rb"job completed seq=1 attempt=2 ", survivor.output())
    assert reply == expected_reply
    assert sum(event.restarted for event in recorder.events) == 1

    by_attempt = attempts_of(chunks)
    assert sorted(by_attempt) == [1, 2]
    assert not any(chunk.final for chunk in by_attempt[1])
    assert by_attempt[2][-1].final


async def test_broker_restart_mid_reply_client_resumes(expected_reply, pool, tmp_path, running):
    """A broker restarted on its port and store mid-reply leaves the client with the whole reply, no gap or duplicate."""
    broker = start_broker(tmp_path / "broker")
    running.append(broker.process)
    worker = start_worker(broker.url, pool, tmp_path, "worker", extra=["--ack-wait", "5"], verbose=True)
    running.append(worker.process)

    async with await Client.connect(broker.url, pool.policy, reply_timeout_s=REPLY_TIMEOUT_S) as client:
        recorder = ReplyRecorder(client)
        complete_at_restart: list[bool] = []

        async def restart_broker() -> None:
            complete_at_restart.append(any(event.final for event in recorder.events))
            stop(broker.process)
            restarted = start_broker(broker.directory, broker.port)
            running.append(restarted.process)

        reply = await ask_while(client, recorder, restart_broker)
        chunks = await stored_chunks(client, recorder.job)

    assert complete_at_restart == [False], "the reply ended before the broker restarted, so the test proved nothing"
    assert reply == expected_reply

    # Every chunk of the attempt the client finished with reached it exactly once, in order.
    by_attempt = attempts_of(chunks)
    last = max(by_attempt)
    assert by_attempt[last][-1].final
    restarts = [index for index, event in enumerate(recorder.events) if event.restarted]
    assert len(restarts) == last - 1
    final_attempt_events = recorder.events[restarts[-1] if restarts else 0 :]
    assert len(final_attempt_events) == len(by_attempt[last])
    assert "".join(event.text for event in final_attempt_events) == expected_reply
    assert [event.final for event in final_attempt_events] == [chunk.final for chunk in by_attempt[last]]
