"""The worker pool on real processes: joining by key release, sharing jobs, the CLI stack.

Each test starts its own nats-server on a fresh store directory and port,
and its own worker processes, so no test reads another's pool key or jobs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import anyio
import nats
import pytest

from conftest import start_broker, start_worker, stop
from confide.broker_config.credentials import load_user_credentials
from confide.broker_config.permissions import OPERATOR_INBOX_PREFIX
from confide.clients.client import Client
from confide.release import append_release
from confide.schemas import subjects
from confide.schemas.attestation import verify_document
from confide.schemas import crypto
from confide.schemas.messages import ChatMessage, GenerationParams, KeyRelease
from confide.workers.epochs import Epoch, EpochRing
from confide.workers.engine import EngineSettings, default_model_path
from confide.workers.measurement import measure

pytestmark = pytest.mark.anyio

QUICK = GenerationParams(max_tokens=24, temperature=0.0)
# Generous: on two busy cores a queued job can wait a minute for its first chunk.
REPLY_TIMEOUT_S = 180
CONFIDE = str(Path(sys.executable).parent / "confide")
# A generous limit for one CLI command: `confide up` loads the model in every
# worker, which takes a few seconds each on two busy cores.
CLI_TIMEOUT_S = 120


@pytest.fixture
def running():
    """Collect the processes a test starts and stop them in reverse order when it ends, pass or fail."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in reversed(processes):
        stop(process)


async def pool_entry(url: str) -> tuple[int, bytes]:
    """Return the revision and bytes of the pool's attestation document in the bucket."""
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(subjects.POOL_BUCKET)
        entry = await kv.get(subjects.ATTESTATION_KEY)
        return entry.revision, entry.value
    finally:
        await nc.close()


async def jobs_last_sequence(url: str, operator_creds: Path | None = None) -> int:
    """Return the jobs stream's last sequence; `operator_creds` for a broker that requires credentials."""
    options = {}
    if operator_creds is not None:
        options = load_user_credentials(operator_creds).connect_options(OPERATOR_INBOX_PREFIX)
    nc = await nats.connect(url, **options)
    try:
        return (await nc.jetstream().stream_info(subjects.JOBS_STREAM)).state.last_seq
    finally:
        await nc.close()


async def test_second_worker_joins_and_shares_jobs(pool, tmp_path, running):
    """A second worker joins by key release, both run jobs, and the second serves alone once the first stops."""
    broker = start_broker(tmp_path / "broker")
    running.append(broker.process)
    first = start_worker(broker.url, pool, tmp_path, "first")
    running.append(first.process)
    document_before = await pool_entry(broker.url)

    second = start_worker(broker.url, pool, tmp_path, "second")
    running.append(second.process)

    assert b"pool key created" in first.output()
    assert b"pool key joined from a pool member" in second.output()
    assert b"pool key released to a joining worker" in first.output()
    assert await pool_entry(broker.url) == document_before

    prompts = [f"Name one fruit that starts with the letter {letter}." for letter in "ABCD"]
    replies: dict[int, str] = {}
    async with await Client.connect(broker.url, pool.policy, reply_timeout_s=REPLY_TIMEOUT_S) as client:
        attested = await client.attest()
        assert attested.key == verify_document(document_before[1], pool.policy, purpose="pool").key

        async def ask(index: int) -> None:
            replies[index] = await client.ask_text([ChatMessage("user", prompts[index])], QUICK)

        async with anyio.create_task_group() as group:
            for index in range(len(prompts)):
                group.start_soon(ask, index)

        assert sorted(replies) == list(range(len(prompts)))
        assert all(reply.strip() for reply in replies.values())
        assert b"job completed" in first.output(), "the first worker ran none of the jobs"
        assert b"job completed" in second.output(), "the second worker ran none of the jobs"
        assert b"unknown_key" not in first.output() + second.output()

        stop(first.process)
        assert first.process.returncode == 0
        completed_before = second.output().count(b"job completed")
        reply = await client.ask_text([ChatMessage("user", prompts[0])], QUICK)

    assert reply == replies[0]
    # The worker logs the job after its ack, which can come after the client read the final chunk.
    with anyio.fail_after(30):
        while second.output().count(b"job completed") < completed_before + 1:
            await anyio.sleep(0.1)
    assert second.output().count(b"job completed") == completed_before + 1


async def test_joiner_with_other_measurement_refused(pool, tmp_path, running):
    """A worker measured with another context size gets no key, exits with an error, and leaves the pool as it was."""
    broker = start_broker(tmp_path / "broker")
    running.append(broker.process)
    member = start_worker(broker.url, pool, tmp_path, "member")
    running.append(member.process)
    document_before = await pool_entry(broker.url)

    # The stranger's build is a logged release too, in a copy of the session's
    # log, so it passes its own start checks and the member is what rejects it.
    stranger_log = tmp_path / "release-log.sqlite3"
    shutil.copyfile(pool.release_log, stranger_log)
    append_release(stranger_log, measure(default_model_path(), EngineSettings(default_model_path(), 2048).measured()))
    with pytest.raises(RuntimeError, match="worker exited with 1"):
        start_worker(broker.url, replace(pool, release_log=stranger_log), tmp_path, "stranger", extra=["--n-ctx", "2048"])
    output = (tmp_path / "stranger.log").read_text(errors="replace")

    assert "confide: a pool member rejected the key release request" in output
    assert "Traceback" not in output
    refusals = [line for line in member.output().decode().splitlines() if "key release refused" in line]
    assert len(refusals) == 1
    # The line names the failed check and a measurement prefix, and carries no key material.
    assert re.search(r"key release refused: rejected a joining worker: measurement [0-9a-f]{16}\.\.\. is not in the allowed set$", refusals[0])
    assert await pool_entry(broker.url) == document_before

    async with await Client.connect(broker.url, pool.policy, reply_timeout_s=REPLY_TIMEOUT_S) as client:
        assert (await client.ask_text([ChatMessage("user", "Say hello.")], QUICK)).strip()


def confide(*arguments: str, stdin: str | None = None, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([CONFIDE, *arguments], input=stdin, capture_output=True, text=True, timeout=timeout_s)


def start_worker_or_error(*arguments, **options):
    """Return the started worker, or the RuntimeError raised because it exited."""
    try:
        return start_worker(*arguments, **options)
    except RuntimeError as exc:
        return exc


async def test_joiner_rejects_release_without_pool_key(pool, tmp_path, running):
    """A release from a responder that does not hold the pool's secret key is refused, and the joiner keeps nothing."""
    broker = start_broker(tmp_path / "broker")
    running.append(broker.process)
    member = start_worker(broker.url, pool, tmp_path, "member")
    running.append(member.process)
    stop(member.process)
    document_before = await pool_entry(broker.url)

    # Something that is not a pool member responds to the key release request
    # with keys of its own, sealed to the joiner's attested one-time key.
    nc = await nats.connect(broker.url)
    answered = []

    async def answer(message) -> None:
        # A join document carries no release evidence, so check its measurement against the list.
        join_key = verify_document(message.data, replace(pool.policy, log_key=None), purpose="join").key
        rogue = EpochRing(grace_s=3600, remember_s=3600)
        rogue.install(Epoch(crypto.KeyPair.generate(), int(time.time())), int(time.time()), current=True)
        answered.append(join_key)
        await message.respond(KeyRelease(crypto.seal(rogue.to_release(), join_key)).to_wire())

    await nc.subscribe(subjects.KEY_RELEASE_SUBJECT, queue="confide-pool", cb=answer)
    await nc.flush()
    try:
        # In a thread, so this event loop stays free to respond to the request.
        joiner = await anyio.to_thread.run_sync(lambda: start_worker_or_error(broker.url, pool, tmp_path, "joiner"))
    finally:
        await nc.close()
    if not isinstance(joiner, RuntimeError):
        running.append(joiner.process)
        pytest.fail("the joiner accepted a release without the pool key")
    output = (tmp_path / "joiner.log").read_text(errors="replace")

    assert "worker exited with 1" in str(joiner)
    assert len(answered) == 1
    assert "confide: the released keys do not include the pool's attested key" in output
    assert "Traceback" not in output
    assert await pool_entry(broker.url) == document_before


def test_cli_up_status_ask_down(tmp_path, prompts):
    """`confide up`, `status`, `ask` (argument and stdin) and `down` work as a user runs them."""
    state = str(tmp_path / "stack")
    common = ["--state-dir", state]

    started = confide("up", "--workers", "2", "--port", "0", *common)
    try:
        assert started.returncode == 0, started.stderr
        assert "pool:    attested" in started.stdout
        record = json.loads((tmp_path / "stack" / "stack.json").read_text())
        assert len(record["worker_pids"]) == 2

        status = confide("status", *common)
        assert status.returncode == 0, status.stderr
        assert "pool:    attested, platform simulated (SIMULATED TEE)" in status.stdout
        assert "(running)" in status.stdout
        assert "worker 0: running" in status.stdout
        assert "worker 1: running" in status.stdout
        assert "stream CONFIDE_JOBS" in status.stdout

        asked = confide("ask", *common, "--max-tokens", "24", "--temperature", "0", prompts["p15"]["prompt"])
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.strip()
        assert "SIMULATED TEE" in asked.stderr

        hindi = prompts["p21"]["prompt"]
        piped = confide("ask", *common, "--max-tokens", "24", "--temperature", "0", "-", stdin=hindi)
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout.strip()

        operator_creds = tmp_path / "stack" / "operator.creds"
        sequence_before = anyio.run(jobs_last_sequence, record["broker_url"], operator_creds)
        empty = confide("ask", *common, "")
        assert empty.returncode == 2
        assert "the prompt is empty" in empty.stderr
        assert empty.stdout == ""
        assert anyio.run(jobs_last_sequence, record["broker_url"], operator_creds) == sequence_before == 2
    finally:
        stopped = confide("down", *common)

    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "stack" / "stack.json").exists()
    assert "no local stack is recorded" in confide("status", *common).stderr


def test_cli_batch_detach_then_fetch(tmp_path, prompts):
    """`confide batch --detach` then `confide fetch --wait` writes the results once; a later fetch leaves them alone."""
    state = str(tmp_path / "stack")
    common = ["--state-dir", state]
    rows = [{"id": "en", "prompt": prompts["p15"]["prompt"]}, {"id": "hi", "prompt": prompts["p21"]["prompt"]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    results = tmp_path / "out.jsonl"

    started = confide("up", "--port", "0", *common)
    try:
        assert started.returncode == 0, started.stderr
        detached = confide("batch", str(tmp_path / "in.jsonl"), "-o", str(results), "--detach", "--max-tokens", "12", *common)
        assert detached.returncode == 0, detached.stderr
        assert "run 'confide fetch' to collect the replies (2 waiting)" in detached.stderr
        assert not results.exists()

        fetched = confide("fetch", "--wait", *common)
        assert fetched.returncode == 0, fetched.stderr
        assert f"complete, wrote 2 results to {results}" in fetched.stdout
        written = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
        assert [row["id"] for row in written] == ["en", "hi"]
        assert all(row["reply"] for row in written)

        results.write_text("edited by the user\n", encoding="utf-8")
        again = confide("fetch", *common)
        assert again.returncode == 0, again.stderr
        assert "nothing to collect" in again.stdout
        assert results.read_text(encoding="utf-8") == "edited by the user\n"
    finally:
        confide("down", *common)
