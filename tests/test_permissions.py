"""Each role's real credential against a real nats-server: what it may do, and each action it is denied.

The broker runs in operator mode with the credentials `confide up` issues
(broker_config/credentials.py). A denied publish or subscribe is a
permission violation that nats-server reports to the connection. A reply
consumer request that passes the permission check but names a wildcard is
rejected by JetStream, and the test then checks that no consumer exists.
"""

from __future__ import annotations

import json

import anyio
import nats
import nats.errors
import pytest

from conftest import stop
from secure_stack import RELAY_NAME, SecureBroker, start_secure_broker, start_secure_worker
from confide.broker_config import permissions
from confide.broker_config.credentials import ClientCredential, load_user_credentials
from confide.broker_config.nkeys import KeyPair, Role
from confide.clients.client import Client
from confide.clients.replies import ReplyFeed
from confide.schemas import crypto, subjects
from confide.schemas.messages import ChatMessage, GenerationParams

pytestmark = pytest.mark.anyio

REPLIES = subjects.REPLIES_STREAM
QUICK = GenerationParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory) -> SecureBroker:
    broker = start_secure_broker(tmp_path_factory.mktemp("secure-broker"), relay=True)
    yield broker
    stop(broker.process)


@pytest.fixture(scope="module")
def secure_worker(secure_broker, pool, tmp_path_factory):
    worker = start_secure_worker(secure_broker, pool, tmp_path_factory.mktemp("secure-worker"))
    yield worker
    stop(worker.process)


class Denials:
    """Collects the permission violations nats-server reports to one connection."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._changed = anyio.Event()

    async def callback(self, exc: Exception) -> None:
        self.messages.append(str(exc).lower())
        self._changed.set()

    async def wait_for(self, action: str, subject: str, timeout_s: float = 10) -> None:
        """Wait until the server reports that `action` ("publish" or "subscription") to `subject` was denied."""
        expected = f'permissions violation for {action} to "{subject.lower()}"'
        with anyio.move_on_after(timeout_s):
            while not any(expected in message for message in self.messages):
                self._changed = anyio.Event()
                await self._changed.wait()
        assert any(expected in message for message in self.messages), f"no denial of {action} to {subject}; got {self.messages}"


async def connect(broker: SecureBroker, role: str) -> tuple[nats.aio.client.Client, Denials]:
    denials = Denials()
    nc = await broker.connect_as(role, error_cb=denials.callback)
    return nc, denials


async def assert_publish_denied(nc, denials: Denials, subject: str, payload: bytes = b"{}") -> None:
    await nc.publish(subject, payload, reply=nc.new_inbox())
    await denials.wait_for("publish", subject)


async def assert_subscribe_denied(nc, denials: Denials, subject: str) -> None:
    subscription = await nc.subscribe(subject)
    await denials.wait_for("subscription", subject)
    await subscription.unsubscribe()


def random_reply_subject() -> str:
    return subjects.reply_subject(crypto.random_bytes(32))


async def reply_consumers(broker: SecureBroker) -> list[str]:
    operator = await broker.connect_as("operator")
    try:
        return [consumer.name for consumer in await operator.jetstream().consumers_info(REPLIES)]
    finally:
        await operator.close()


async def consumer_request(nc, prefix: str, name: str, token: str, filter_subject: str, deliver_subject: str, **extra) -> dict:
    """Send a raw subject-filtered consumer create request under an API prefix and return the JetStream response."""
    subject = f"{prefix}.CONSUMER.CREATE.{REPLIES}.{name}.{subjects.REPLY_SUBJECT_PREFIX}.{token}.{subjects.REPLY_SUBJECT_SUFFIX}"
    config = {"name": name, "filter_subject": filter_subject, "deliver_subject": deliver_subject, "ack_policy": "none", "mem_storage": True, **extra}
    response = await nc.request(subject, json.dumps({"stream_name": REPLIES, "config": config}).encode(), timeout=5)
    return json.loads(response.data)


async def test_unauthenticated_connection_rejected(secure_broker):
    """No credential, or a client JWT signed by an unknown key, cannot connect."""
    with pytest.raises(nats.errors.Error):
        await nats.connect(secure_broker.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=5)

    stranger = ClientCredential(secure_broker.authority.account.public_key, KeyPair.generate(Role.ACCOUNT))
    with pytest.raises(nats.errors.Error):
        await nats.connect(secure_broker.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=5, **stranger.connect_options())


async def test_relay_credential_client_rejected(secure_broker):
    """A relay's credential serves only its leaf node connection; as a client connection it is rejected."""
    relay = load_user_credentials(secure_broker.credentials.relay(RELAY_NAME))
    with pytest.raises(nats.errors.Error):
        await nats.connect(
            secure_broker.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=5, **relay.connect_options("_INBOX_RELAY_edge")
        )


async def test_client_reads_own_reply_others_see_nothing(secure_broker, secure_worker, pool):
    """A client gets its own streamed reply; a second client, listening everywhere it may, receives nothing."""
    watcher, _ = await connect(secure_broker, "client")
    seen = []

    async def record(message) -> None:
        seen.append(message.subject)

    try:
        await watcher.subscribe(f"{watcher._inbox_prefix.decode()}.>", cb=record)
        await watcher.flush()
        async with await Client.connect(secure_broker.url, pool.policy, reply_timeout_s=120, credentials=secure_broker.client_credential()) as client:
            reply = await client.ask_text([ChatMessage("user", "Name one colour.")], QUICK)
        await watcher.flush()
    finally:
        await watcher.close()

    assert reply.strip()
    assert seen == []


async def test_client_subscribe_reply_subjects_denied(secure_broker):
    """A client may not subscribe to reply subjects, with or without wildcards."""
    nc, denials = await connect(secure_broker, "client")
    try:
        for subject in (
            f"{subjects.REPLY_SUBJECT_PREFIX}.*.{subjects.REPLY_SUBJECT_SUFFIX}",
            f"{subjects.REPLY_SUBJECT_PREFIX}.>",
            random_reply_subject(),
            ">",
        ):
            await assert_subscribe_denied(nc, denials, subject)
    finally:
        await nc.close()


async def test_client_subscribe_other_inboxes_denied(secure_broker):
    """A client may subscribe only under its own inbox prefix, never another client's or role's."""
    nc, denials = await connect(secure_broker, "client")
    other, _ = await connect(secure_broker, "client")
    try:
        other_prefix = other._inbox_prefix.decode()
        assert other_prefix != nc._inbox_prefix.decode()
        for subject in ("_INBOX.>", "_INBOX.*.>", "_INBOX.*.*", f"{other_prefix}.>", f"{other_prefix}.*", "_INBOX_WORKER.>", "_INBOX_OPERATOR.>"):
            await assert_subscribe_denied(nc, denials, subject)
    finally:
        await nc.close()
        await other.close()


async def test_client_read_jobs_stream_denied(secure_broker):
    """A client may publish jobs but not read them back by any route."""
    nc, denials = await connect(secure_broker, "client")
    try:
        await assert_subscribe_denied(nc, denials, subjects.JOBS_SUBJECT)
        for subject in (
            f"$JS.API.CONSUMER.CREATE.{subjects.JOBS_STREAM}",
            f"$JS.API.CONSUMER.CREATE.{subjects.JOBS_STREAM}.spy.{subjects.JOBS_SUBJECT}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.JOBS_STREAM}.spy",
            f"$JS.API.CONSUMER.MSG.NEXT.{subjects.JOBS_STREAM}.{subjects.WORKERS_CONSUMER}",
            f"$JS.API.STREAM.MSG.GET.{subjects.JOBS_STREAM}",
            f"$JS.API.DIRECT.GET.{subjects.JOBS_STREAM}.{subjects.JOBS_SUBJECT}",
            f"$JS.API.STREAM.INFO.{subjects.JOBS_STREAM}",
        ):
            await assert_publish_denied(nc, denials, subject)
    finally:
        await nc.close()


async def test_client_wildcard_reply_consumer_denied(secure_broker, secure_worker):
    """No route lets a client create a consumer on reply subjects other than one it names in full."""
    nc, denials = await connect(secure_broker, "client")
    inbox = nc.new_inbox()
    deliveries = await nc.subscribe(inbox)
    reply_prefix = subjects.REPLY_SUBJECT_PREFIX
    try:
        # The general consumer API, and subject-filtered requests whose
        # filter a wildcard would widen, are not in the client's allow list.
        for subject in (
            f"$JS.API.CONSUMER.CREATE.{REPLIES}",
            f"$JS.API.CONSUMER.CREATE.{REPLIES}.spy",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{REPLIES}.spy",
            f"$JS.API.CONSUMER.CREATE.{REPLIES}.spy.{reply_prefix}.>",
            f"$JS.API.CONSUMER.CREATE.{REPLIES}.spy.{reply_prefix}.*.>",
            f"$JS.API.CONSUMER.CREATE.{REPLIES}.spy.confide.>",
            f"$JS.API.DIRECT.GET.{REPLIES}",
            f"$JS.API.DIRECT.GET.{REPLIES}.{reply_prefix}.*.{subjects.REPLY_SUBJECT_SUFFIX}",
            f"$JS.API.STREAM.MSG.GET.{REPLIES}",
            f"$JS.API.STREAM.INFO.{REPLIES}",
        ):
            await assert_publish_denied(nc, denials, subject)

        # The allowed form, through the client API and through $JS.API, with
        # a wildcard token: the account mapping makes the token the consumer
        # name, which JetStream rejects, or no server subscription receives it.
        wildcard_filter = f"{reply_prefix}.*.{subjects.REPLY_SUBJECT_SUFFIX}"
        cases = (("spy", "*", wildcard_filter), ("*", "*", wildcard_filter), (">", "*", wildcard_filter), ("spy", ">", f"{reply_prefix}.>.{subjects.REPLY_SUBJECT_SUFFIX}"))
        for prefix in (permissions.CLIENT_API_PREFIX, permissions.JS_API_PREFIX):
            for name, token, filter_subject in cases:
                try:
                    response = await consumer_request(nc, prefix, name, token, filter_subject, inbox)
                except nats.errors.NoRespondersError:
                    continue
                assert "error" in response, (prefix, name, token)

            # A literal token with a wider filter in the request body.
            token = random_reply_subject().split(".")[-2]
            response = await consumer_request(nc, prefix, token, token, wildcard_filter, inbox)
            assert "error" in response, prefix
            exact_filter = f"{reply_prefix}.{token}.{subjects.REPLY_SUBJECT_SUFFIX}"
            response = await consumer_request(nc, prefix, token, token, exact_filter, inbox, filter_subjects=[wildcard_filter])
            assert "error" in response, prefix

        assert await reply_consumers(secure_broker) == []
        with pytest.raises(nats.errors.TimeoutError):
            await deliveries.next_msg(timeout=1)
    finally:
        await nc.close()


async def test_client_purge_delete_forge_replies_denied(secure_broker, secure_worker):
    """A client may not purge, delete or write replies, change streams, or delete another reader's consumer."""
    nc, denials = await connect(secure_broker, "client")
    victim, _ = await connect(secure_broker, "client")
    victim_subject = random_reply_subject()
    try:
        for subject in (
            f"$JS.API.STREAM.PURGE.{REPLIES}",
            f"$JS.API.STREAM.MSG.DELETE.{REPLIES}",
            f"$JS.API.STREAM.DELETE.{REPLIES}",
            f"$JS.API.STREAM.UPDATE.{REPLIES}",
            f"$JS.API.STREAM.CREATE.{REPLIES}",
            random_reply_subject(),
            permissions.ATTESTATION_SUBJECT,
        ):
            await assert_publish_denied(nc, denials, subject)

        async with ReplyFeed(victim, victim_subject):
            name = permissions.reply_consumer_name(victim_subject)
            assert await reply_consumers(secure_broker) == [name]
            for wildcard in ("*", ">"):
                response = await nc.request(f"$JS.API.CONSUMER.DELETE.{REPLIES}.{wildcard}", b"", timeout=5)
                assert "error" in json.loads(response.data)
            assert await reply_consumers(secure_broker) == [name]
        assert await reply_consumers(secure_broker) == []
    finally:
        await nc.close()
        await victim.close()


async def test_worker_connection_details_denied(secure_broker):
    """A worker credential cannot ask the server about connections or read events, advisories or client inboxes."""
    nc, denials = await connect(secure_broker, "worker")
    try:
        for subject in (
            "$SYS.REQ.ACCOUNT.PING.CONNZ",
            "$SYS.REQ.SERVER.PING.CONNZ",
            "$SYS.REQ.USER.INFO",
            f"$SYS.REQ.ACCOUNT.{secure_broker.authority.account.public_key}.CONNZ",
            subjects.JOBS_SUBJECT,
        ):
            await assert_publish_denied(nc, denials, subject)
        for subject in ("$SYS.>", "$JS.EVENT.>", "_INBOX.>", f"{subjects.REPLY_SUBJECT_PREFIX}.>", ">"):
            await assert_subscribe_denied(nc, denials, subject)
    finally:
        await nc.close()


async def test_operator_changes_denied(secure_broker):
    """The operator credential reads stream state but cannot change it, publish jobs or see connections."""
    nc, denials = await connect(secure_broker, "operator")
    try:
        names = [info.config.name for info in await nc.jetstream().streams_info()]
        assert subjects.REPLIES_STREAM in names
        for subject in (
            f"$JS.API.STREAM.PURGE.{REPLIES}",
            f"$JS.API.STREAM.DELETE.{subjects.JOBS_STREAM}",
            f"$JS.API.STREAM.MSG.DELETE.{REPLIES}",
            f"$JS.API.CONSUMER.CREATE.{REPLIES}",
            subjects.JOBS_SUBJECT,
            "$SYS.REQ.ACCOUNT.PING.CONNZ",
        ):
            await assert_publish_denied(nc, denials, subject)
        for subject in ("_INBOX.>", "$JS.EVENT.>", f"{subjects.REPLY_SUBJECT_PREFIX}.>"):
            await assert_subscribe_denied(nc, denials, subject)
    finally:
        await nc.close()
