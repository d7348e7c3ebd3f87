"""Read the stored chunks of one reply subject as they arrive, through the only consumer a client may create.

A client may not subscribe to reply subjects or use the general consumer
API (broker_config/permissions.py). It creates a push consumer with the
subject-filtered API, named by the reply subject's random token, that
delivers into the client's own inbox. The consumer works like nats-py's
ordered consumer: no acks, flow control, idle heartbeats, memory storage,
and it is created again from the next stream sequence after a gap, a
missed heartbeat or a reconnect.
"""

from __future__ import annotations

import json
import logging
import time

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header

from confide.broker_config import permissions
from confide.errors import BrokerError
from confide.schemas import subjects

log = logging.getLogger("confide.client.replies")

HEARTBEAT_S = 2.0
# A consumer that sent nothing, not even a heartbeat, for this long is gone
# (a broker restart or a lost connection): create it again.
MISSED_HEARTBEATS = 3
# The broker removes a consumer left without interest for this long, for
# example by a client that crashed.
INACTIVE_THRESHOLD_S = 30.0
API_TIMEOUT_S = 5.0
NANOSECONDS = 1_000_000_000
STATUS_CONTROL = "100"
# JetStream errors for a consumer of that name that is still there, left by
# an earlier reader: 10013 "consumer name already in use" (the other reader
# is still subscribed) and 10012, here "deliver policy can not be updated"
# or "heart beats can not be updated" (measured on nats-server 2.15.1).
CONSUMER_EXISTS_CODES = frozenset({10012, 10013})


class ReplyFeed:
    """The raw chunks stored on one reply subject, in stream order; an async context manager."""

    def __init__(self, nc: NATS, reply_subject: str) -> None:
        self._nc = nc
        self._reply_subject = reply_subject
        self._subscription: Subscription | None = None
        self._next_stream_sequence = 1
        self._expected_delivery = 1
        self._broken = False
        # When the consumer last sent anything, kept across next_chunk calls
        # so that short waits still notice a consumer that went silent.
        self._last_activity = time.monotonic()

    async def open(self) -> None:
        """Create the consumer; raise BrokerError if the broker refuses it."""
        try:
            await self._start(replace_existing=False)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the deliveries and delete the consumer; safe to call more than once."""
        with anyio.CancelScope(shield=True):
            had_subscription = self._subscription is not None
            await self._unsubscribe()
            if had_subscription and not self._nc.is_closed:
                await delete_reply_consumer(self._nc, self._reply_subject)

    async def __aenter__(self) -> ReplyFeed:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def next_chunk(self, timeout_s: float) -> bytes:
        """Return the next stored chunk's bytes; raise TimeoutError if none arrives within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise TimeoutError("no reply chunk arrived in time")
            if self._broken:
                await self._restart()
                if self._broken:
                    await anyio.sleep(min(remaining, HEARTBEAT_S))
                    continue
            silence_left = self._last_activity + HEARTBEAT_S * MISSED_HEARTBEATS - now
            if silence_left <= 0:
                self._broken = True
                continue

            assert self._subscription is not None
            try:
                message = await self._subscription.next_msg(timeout=min(remaining, silence_left))
            except nats.errors.TimeoutError:
                continue
            except nats.errors.Error as exc:
                log.warning("reading the reply failed: %s; reading it again", type(exc).__name__)
                self._broken = True
                continue

            self._last_activity = time.monotonic()
            if message.headers and message.headers.get(Header.STATUS) == STATUS_CONTROL:
                await self._handle_control(message)
            elif (chunk := self._accept(message)) is not None:
                return chunk

    def _accept(self, message: Msg) -> bytes | None:
        try:
            sequence = message.metadata.sequence
        except (ValueError, IndexError, TypeError):
            log.warning("ignored a delivery without JetStream metadata")
            return None
        if sequence.consumer != self._expected_delivery:
            # Deliveries are not acknowledged, so one was lost on the way:
            # start again after the last chunk taken.
            self._broken = True
            return None
        self._expected_delivery += 1
        self._next_stream_sequence = sequence.stream + 1
        return message.data

    async def _handle_control(self, message: Msg) -> None:
        headers = message.headers or {}
        flow_control_reply = message.reply or headers.get(Header.CONSUMER_STALLED)
        if flow_control_reply:
            await self._nc.publish(flow_control_reply, b"")
        last_delivery = headers.get(Header.LAST_CONSUMER)
        if last_delivery is not None and last_delivery.isdigit() and int(last_delivery) != self._expected_delivery - 1:
            self._broken = True

    async def _restart(self) -> None:
        """Create the consumer again after the last chunk taken; stay broken if the broker is unreachable."""
        try:
            await self._start(replace_existing=True)
        except BrokerError as exc:
            log.warning("%s; trying again", exc)
            return
        self._broken = False

    async def _start(self, replace_existing: bool) -> None:
        # A fresh inbox each time, so deliveries of a replaced consumer that
        # are still on their way are never mistaken for the new one's.
        await self._unsubscribe()
        inbox = self._nc.new_inbox()
        self._subscription = await self._nc.subscribe(inbox)
        self._expected_delivery = 1
        self._last_activity = time.monotonic()
        config: dict[str, object] = {
            "name": permissions.reply_consumer_name(self._reply_subject),
            "filter_subject": self._reply_subject,
            "deliver_subject": inbox,
            "ack_policy": "none",
            "max_deliver": 1,
            "replay_policy": "instant",
            "flow_control": True,
            "idle_heartbeat": int(HEARTBEAT_S * NANOSECONDS),
            "inactive_threshold": int(INACTIVE_THRESHOLD_S * NANOSECONDS),
            "mem_storage": True,
            "num_replicas": 1,
        }
        if self._next_stream_sequence > 1:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=self._next_stream_sequence)
        else:
            config["deliver_policy"] = "all"

        if replace_existing:
            await delete_reply_consumer(self._nc, self._reply_subject)
        error = (await create_reply_consumer(self._nc, self._reply_subject, config)).get("error")
        if error is not None:
            raise BrokerError(f"the broker rejected the reply consumer (JetStream error {error.get('err_code')}); check that it runs confide's streams")

    async def _unsubscribe(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        try:
            await subscription.unsubscribe()
        except nats.errors.Error:
            pass


async def reply_waiting(nc: NATS, reply_subject: str) -> bool:
    """Return whether the broker stores any chunk of `reply_subject`, using a short-lived pull consumer."""
    config = {
        "name": permissions.reply_consumer_name(reply_subject),
        "filter_subject": reply_subject,
        "ack_policy": "none",
        "mem_storage": True,
        "num_replicas": 1,
        "inactive_threshold": int(INACTIVE_THRESHOLD_S * NANOSECONDS),
    }
    response = await create_reply_consumer(nc, reply_subject, config)
    await delete_reply_consumer(nc, reply_subject)
    if "error" in response:
        raise BrokerError(f"the broker rejected the reply lookup (JetStream error {response['error'].get('err_code')}); check that it runs confide's streams")
    return int(response.get("num_pending", 0)) > 0


async def create_reply_consumer(nc: NATS, reply_subject: str, config: dict[str, object]) -> dict:
    """Create the consumer for `reply_subject`, replacing one an earlier reader left; return the JSON response."""
    subject = permissions.reply_consumer_create_subject(reply_subject)
    request = json.dumps({"stream_name": subjects.REPLIES_STREAM, "config": config}).encode()
    response = await _api_request(nc, subject, request)
    if response.get("error", {}).get("err_code") in CONSUMER_EXISTS_CODES:
        await delete_reply_consumer(nc, reply_subject)
        response = await _api_request(nc, subject, request)
    return response


async def delete_reply_consumer(nc: NATS, reply_subject: str) -> None:
    """Delete the consumer of `reply_subject` if it exists; a failure leaves it to expire."""
    try:
        await _api_request(nc, permissions.reply_consumer_delete_subject(reply_subject), b"")
    except BrokerError:
        pass


async def _api_request(nc: NATS, subject: str, payload: bytes) -> dict:
    try:
        response = await nc.request(subject, payload, timeout=API_TIMEOUT_S)
    except nats.errors.Error as exc:
        raise BrokerError(f"a JetStream request for a reply failed: {type(exc).__name__}") from None
    try:
        return json.loads(response.data)
    except ValueError:
        raise BrokerError("the broker sent a JetStream response that is not JSON") from None
