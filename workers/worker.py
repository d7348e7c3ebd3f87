"""The worker process: join the pool, then pull and run jobs and publish their replies until stopped."""

from __future__ import annotations

import logging
import signal
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import nats
import nats.errors
from nats.aio.client import Client as NATS

from confide.broker_config.credentials import load_user_credentials, tls_context
from confide.broker_config.permissions import WORKER_INBOX_PREFIX
from confide.broker_config.topology import Topology, ensure_topology
from confide.errors import AttestationError, ConfideError, TeeError, TransparencyError, WorkerStartError
from confide.schemas import crypto, subjects
from confide.schemas.attestation import TrustPolicy
from confide.schemas.messages import ReleaseEvidence
from confide.schemas.sev_snp import SnpTrustPolicy, parse_report, verify_report
from confide.workers.engine import Engine, EngineSettings
from confide.workers.job import JobRunner, JobSettings
from confide.workers.measurement import measure
from confide.workers.pool_key import EpochSettings, PlatformRoots, PoolIdentity, PoolKeyHolder
from confide.workers.release_evidence import find_evidence
from confide.workers.stats import WorkerStats
from confide.workers.tee import SimulatedTee, TeeBackend, load_platform_key
from confide.workers.tee_tsm import DEFAULT_CONFIGFS_ROOT, ConfigfsTsmTee

TEE_BACKENDS = ("simulated", "configfs-tsm")

log = logging.getLogger("confide.worker")


@dataclass(frozen=True)
class WorkerSettings:
    broker_url: str
    # The simulated platform's root key; only the "simulated" backend reads it.
    platform_key_path: Path | None
    engine: EngineSettings
    jobs: JobSettings = field(default_factory=JobSettings)
    topology: Topology = field(default_factory=Topology)
    attestation_lifetime_s: int = 3600
    epochs: EpochSettings = field(default_factory=EpochSettings)
    # The release log's verify key; the worker proves its measurement is a
    # logged release. Without one, or in dev_mode, it runs without that proof.
    log_key: bytes | None = None
    dev_mode: bool = False
    fetch_timeout_s: float = 5.0
    # The worker user's .creds file and the CA file that verifies the
    # broker's TLS certificate; None for a broker without either.
    credentials_path: Path | None = None
    tls_ca: Path | None = None
    stats_path: Path | None = None
    stats_interval_s: float = 5.0
    # "simulated" or "configfs-tsm" (an SEV-SNP guest). The hardware backend
    # needs `sev_snp`, the AMD root and TCB minimum it checks its peers against.
    tee: str = "simulated"
    configfs_root: Path = DEFAULT_CONFIGFS_ROOT
    tsm_report_name: str | None = None
    sev_snp: SnpTrustPolicy | None = None


async def run_worker(settings: WorkerSettings, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run one worker until cancelled; signals `task_status` once it takes jobs."""
    measurement = await anyio.to_thread.run_sync(measure, settings.engine.model_path, settings.engine.measured())
    # The TEE opens before the model loads, so a worker that cannot attest fails in seconds.
    tee, roots = await anyio.to_thread.run_sync(_open_tee, settings, measurement)
    try:
        log.info("measurement %s platform=%s simulated=%s", measurement.hex(), tee.platform, tee.simulated)
        log.info("loading model %s", settings.engine.model_path.name)
        engine = await anyio.to_thread.run_sync(Engine, settings.engine)
        await _serve(settings, engine, tee, roots, measurement, task_status)
    finally:
        _close_tee(tee)


async def _serve(
    settings: WorkerSettings,
    engine: Engine,
    tee: TeeBackend,
    roots: PlatformRoots,
    measurement: bytes,
    task_status: anyio.abc.TaskStatus[None],
) -> None:
    nc = await _connect(settings)
    try:
        js = nc.jetstream()
        await ensure_topology(js, settings.topology)
        kv = await js.key_value(subjects.POOL_BUCKET)
        release = await _release_evidence(js, measurement, settings)
        identity = PoolIdentity(tee, measurement, engine.model_name, settings.attestation_lifetime_s, settings.dev_mode, release)
        pool = PoolKeyHolder(nc, kv, identity, identity.member_policy(roots), settings.epochs)
        how = await pool.join_or_create()
        log.info("pool key %s (%s)", "joined from a pool member" if how == "joined" else "created", how)

        stats = WorkerStats()
        # Progress acks must reach JetStream well within the ack wait, or it
        # delivers a job that is still running to a second worker.
        job_settings = replace(
            settings.jobs,
            max_deliver=settings.topology.max_deliver,
            progress_interval_s=min(settings.jobs.progress_interval_s, settings.topology.ack_wait_s / 3),
        )
        runner = JobRunner(js, engine, pool, stats, job_settings)
        consumer = await js.pull_subscribe_bind(durable=subjects.WORKERS_CONSUMER, stream=subjects.JOBS_STREAM)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.serve_key_release)
            tg.start_soon(pool.maintain)
            if settings.stats_path is not None:
                tg.start_soon(_write_stats, stats, settings.stats_path, settings.stats_interval_s)
            log.info("worker ready: taking jobs from %s", subjects.JOBS_SUBJECT)
            task_status.started()
            try:
                await _pull_jobs(consumer, runner, settings.fetch_timeout_s)
            finally:
                log.info("worker stopping: %s", dict(stats.snapshot()))
                if settings.stats_path is not None:
                    stats.write(settings.stats_path)
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()


def _open_tee(settings: WorkerSettings, measurement: bytes) -> tuple[TeeBackend, PlatformRoots]:
    """Open the configured TEE backend; return it with the roots its pool members verify each other against."""
    if settings.tee == "simulated":
        if settings.platform_key_path is None:
            raise WorkerStartError("the simulated TEE needs its platform key file")
        platform_key = load_platform_key(settings.platform_key_path)
        return SimulatedTee(platform_key), PlatformRoots(platform_keys={"simulated": platform_key.verify_key})
    if settings.tee != "configfs-tsm":
        raise WorkerStartError(f"unknown TEE backend '{settings.tee}', expected one of {', '.join(TEE_BACKENDS)}")

    try:
        tee = ConfigfsTsmTee.open(settings.configfs_root, settings.tsm_report_name)
    except TeeError as exc:
        raise WorkerStartError(str(exc)) from None
    try:
        launch_policy = _check_own_report(tee, settings, measurement)
    except BaseException:
        _close_tee(tee)
        raise
    return tee, PlatformRoots(sev_snp=launch_policy)


def _close_tee(tee: TeeBackend) -> None:
    try:
        tee.close()
    except TeeError as exc:
        log.warning("%s", exc)


def _check_own_report(tee: ConfigfsTsmTee, settings: WorkerSettings, measurement: bytes) -> SnpTrustPolicy:
    """Verify a report of our own as a client would, so a worker that no one can trust fails at start.

    Return the policy pool members hold each other to: the pinned AMD root,
    the minimum TCB and exactly this worker's launch measurement.
    """
    if tee.platform != "sev-snp":
        raise WorkerStartError(
            f"this guest's configfs-tsm reports are {tee.platform} reports, which confide cannot verify yet; "
            "only SEV-SNP guests can run a hardware worker"
        )
    if settings.sev_snp is None:
        raise WorkerStartError(
            "the trust policy has no sev_snp section, so this worker cannot check its own report or its peers': "
            "pin AMD's root with 'confide trust pin-sev-snp'"
        )
    try:
        # A throwaway key: this report is checked here and never published.
        probe = tee.attest(measurement, "join", crypto.KeyPair.generate().public, settings.engine.model_path.name, 60)
        launch_measurement = parse_report(probe.report).measurement
        own = replace(settings.sev_snp, launch_measurements=frozenset({launch_measurement}))
        report = verify_report(probe.report, probe.certificates, own, probe.report_data())
    except (TeeError, AttestationError) as exc:
        raise WorkerStartError(f"this worker's own SEV-SNP report does not verify: {exc}") from None

    log.info("SEV-SNP report verified: launch measurement %s, TCB (%s)", launch_measurement.hex(), report.reported_tcb)
    if launch_measurement not in settings.sev_snp.launch_measurements:
        if not settings.dev_mode:
            raise WorkerStartError(
                f"this guest's launch measurement {launch_measurement.hex()} is not in the trust policy's sev_snp "
                "launch_measurements, so clients would refuse it; add it, or start the worker with --dev"
            )
        log.warning("DEVELOPMENT MODE: this guest's launch measurement is not in the trust policy; clients refuse it")
    return own


async def _connect(settings: WorkerSettings) -> NATS:
    options: dict = {}
    if settings.credentials_path is not None:
        options.update(load_user_credentials(settings.credentials_path).connect_options(WORKER_INBOX_PREFIX))
    if settings.tls_ca is not None:
        options["tls"] = tls_context(settings.tls_ca)

    events = _BrokerEvents(settings.broker_url)
    nc = await nats.connect(
        settings.broker_url,
        name="confide-worker",
        max_reconnect_attempts=-1,
        reconnect_time_wait=RECONNECT_WAIT_S,
        error_cb=events.on_error,
        disconnected_cb=events.on_disconnect,
        reconnected_cb=events.on_reconnect,
        **options,
    )
    events.client = nc
    return nc


RECONNECT_WAIT_S = 0.5
# While the broker stays away, repeat the warning at most this often.
ERROR_LOG_EVERY_S = 30.0


class _BrokerEvents:
    """Log the broker connection's troubles once, then at most every ERROR_LOG_EVERY_S seconds."""

    def __init__(self, url: str) -> None:
        self.url = _without_userinfo(url)
        self.client: NATS | None = None
        self._errors = 0
        self._logged_at: float | None = None

    async def on_error(self, exc: Exception) -> None:
        self._errors += 1
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < ERROR_LOG_EVERY_S:
            return
        self._logged_at = now
        log.warning(
            "cannot reach the broker at %s (%s, %d error(s) so far); retrying every %.1f s",
            self.url, type(exc).__name__, self._errors, RECONNECT_WAIT_S,
        )

    async def on_disconnect(self) -> None:
        if self.client is not None and self.client.is_closed:
            return  # this worker closed the connection itself, on its way out
        log.warning("disconnected from the broker at %s; reconnecting", self.url)

    async def on_reconnect(self) -> None:
        self._logged_at = None
        log.info("reconnected to the broker at %s", self.url)


def _without_userinfo(url: str) -> str:
    """Drop a user name or password from a broker URL before it is logged."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def _pull_jobs(consumer, runner: JobRunner, fetch_timeout_s: float) -> None:
    # One job at a time: the engine has one model context, so fetching more
    # would hold jobs that another worker could run now.
    while True:
        try:
            messages = await consumer.fetch(1, timeout=fetch_timeout_s)
        except nats.errors.TimeoutError:
            continue
        except nats.errors.ConnectionClosedError:
            raise
        except nats.errors.Error as exc:
            log.warning("fetching jobs failed: %s; retrying", type(exc).__name__)
            await anyio.sleep(1)
            continue
        for message in messages:
            try:
                await runner.run(message)
            except Exception as exc:
                # A broker failure mid-job: the job stays unacknowledged and
                # JetStream redelivers it after the ack wait.
                log.error("job failed seq=%d error=%s", message.metadata.sequence.stream, type(exc).__name__)


async def _release_evidence(js, measurement: bytes, settings: WorkerSettings) -> ReleaseEvidence | None:
    """Find this worker's release in the log; refuse to start without one unless in development mode."""
    if settings.dev_mode:
        log.warning("DEVELOPMENT MODE: this worker's measurement need not be a logged release, and its attestation declares it")
    if settings.log_key is None:
        if not settings.dev_mode:
            log.warning("no release log key configured: the attestation carries no release proof")
        return None
    try:
        evidence = await find_evidence(js, measurement, settings.log_key)
    except TransparencyError as exc:
        if settings.dev_mode:
            log.warning("release log unavailable (%s); continuing in development mode", exc)
            return None
        raise WorkerStartError(f"cannot check this worker against the release log: {exc}") from None
    if evidence is None and not settings.dev_mode:
        raise WorkerStartError(
            f"measurement {measurement.hex()} is not in the release log: run 'confide release' for this build, "
            "or start the worker with --dev"
        )
    return evidence


async def _write_stats(stats: WorkerStats, path: Path, interval_s: float) -> None:
    while True:
        stats.write(path)
        await anyio.sleep(interval_s)


def main(settings: WorkerSettings) -> None:
    """Run a worker in the foreground until SIGINT or SIGTERM.

    Raises the ConfideError that stopped it (PoolJoinError, WorkerStartError)
    outside any exception group, so the CLI prints it as one line.
    """

    async def supervise() -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_signal, tg.cancel_scope)
                await run_worker(settings)
                tg.cancel_scope.cancel()
        except* ConfideError as group:
            raise group.exceptions[0] from None

    anyio.run(supervise)


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for received in signals:
            log.info("received %s, finishing", signal.Signals(received).name)
            scope.cancel()
            return
