"""Publish and subscribe permissions of each broker role, and the account's subject mappings.

broker_config/README.md explains the design and the nats-server behaviour it
rests on, measured on nats-server 2.15. In short:

- Every client connects with its own fresh user nkey, signed by one shared
  scoped signing key. The scope's template grants subscriptions only under
  `_INBOX.<that nkey>.>`, so a client cannot subscribe to another
  client's inbox, with or without wildcards.
- A client reads a reply through a push consumer that it creates with the
  subject-filtered consumer API. The account maps every such request so
  that the consumer's name equals the reply subject's random token. A
  wildcard in that token becomes a consumer name the server rejects. A
  reply subject never ends in its random token, so ">" cannot replace it.
- Workers, the operator and relays get fixed users whose allow lists name
  each subject they need, mostly literally.
"""

from __future__ import annotations

from typing import Any

from confide.schemas import subjects
from confide.schemas.release_feed import LOG_BUCKET

KV_STREAM = f"KV_{subjects.POOL_BUCKET}"
ATTESTATION_SUBJECT = f"$KV.{subjects.POOL_BUCKET}.{subjects.ATTESTATION_KEY}"
LOG_STREAM = f"KV_{LOG_BUCKET}"
# Reading a key-value bucket: its stream's info, then each key's last message.
READ_RELEASE_LOG = [f"$JS.API.STREAM.INFO.{LOG_STREAM}", f"$JS.API.STREAM.MSG.GET.{LOG_STREAM}"]

# Inbox prefixes (nats-py `inbox_prefix`), one namespace per role so that no
# role's subscribe permission covers another role's inboxes. A client's
# prefix ends in its connection's user nkey; SUBJECT_TEMPLATE is the
# nats-server template that expands to that nkey.
SUBJECT_TEMPLATE = "{{subject()}}"
CLIENT_INBOX_ROOT = "_INBOX"
# Clients of a relay get their own scope and inbox root, so that a relay's
# leaf connection receives deliveries for its own clients only.
RELAY_INBOX_ROOT = "_INBOX_RELAY"
WORKER_INBOX_PREFIX = "_INBOX_WORKER"
OPERATOR_INBOX_PREFIX = "_INBOX_OPERATOR"
RELEASE_INBOX_PREFIX = "_INBOX_RELEASE"

# Clients call a handful of JetStream API requests under their own prefix
# (nats-py's JetStreamContext prefix), and the account maps each onto
# $JS.API. A relay's clients need this: nats-server denies $JS.API.> on a
# leaf node connection between servers that do not share one JetStream.
CLIENT_API_PREFIX = "confide.api.v1"
JS_API_PREFIX = "$JS.API"
# The subject-filtered consumer API: CONSUMER.CREATE.<stream>.<name>.<filter>;
# nats-server requires the request's filter_subject to equal <filter>.
REPLY_CONSUMER_CREATE = f"CONSUMER.CREATE.{subjects.REPLIES_STREAM}.*.{subjects.REPLY_SUBJECT_PREFIX}.*.{subjects.REPLY_SUBJECT_SUFFIX}"
REPLY_CONSUMER_DELETE = f"CONSUMER.DELETE.{subjects.REPLIES_STREAM}.*"
# Every such request is rewritten so that the consumer's name is the reply
# subject's token. Permissions are checked on the rewritten subject, and a
# "*" token is not a valid consumer name. A ">" token is not matched by the
# mapping, but it can only stand where the server rejects it or nothing
# listens: as the name, or before the fixed last token of the filter.
_FORCED_NAME_CREATE = (
    f"{JS_API_PREFIX}.CONSUMER.CREATE.{subjects.REPLIES_STREAM}.{{{{wildcard(2)}}}}"
    f".{subjects.REPLY_SUBJECT_PREFIX}.{{{{wildcard(2)}}}}.{subjects.REPLY_SUBJECT_SUFFIX}"
)
# API requests a client may make, after the API prefix.
CLIENT_API_CALLS = (
    f"STREAM.INFO.{KV_STREAM}",
    f"STREAM.MSG.GET.{KV_STREAM}",
    f"STREAM.INFO.{LOG_STREAM}",
    f"STREAM.MSG.GET.{LOG_STREAM}",
    REPLY_CONSUMER_CREATE,
    REPLY_CONSUMER_DELETE,
)
# Flow control requests of a client's reply consumer arrive with a reply
# subject under this prefix; a client may respond to each once.
FLOW_CONTROL_PREFIX = f"$JS.FC.{subjects.REPLIES_STREAM}"
RESPOND_ONCE = {"max": 1, "ttl": 0}


def account_mappings() -> dict[str, str]:
    """Subject mappings of confide's account: the client API onto $JS.API, and the forced consumer name."""
    mappings = {f"{CLIENT_API_PREFIX}.{call}": f"{JS_API_PREFIX}.{call}" for call in CLIENT_API_CALLS if "*" not in call}
    mappings[f"{CLIENT_API_PREFIX}.{REPLY_CONSUMER_CREATE}"] = _FORCED_NAME_CREATE
    mappings[f"{JS_API_PREFIX}.{REPLY_CONSUMER_CREATE}"] = _FORCED_NAME_CREATE
    mappings[f"{CLIENT_API_PREFIX}.{REPLY_CONSUMER_DELETE}"] = f"{JS_API_PREFIX}.CONSUMER.DELETE.{subjects.REPLIES_STREAM}.{{{{wildcard(1)}}}}"
    return mappings


def reply_consumer_create_subject(reply_subject: str) -> str:
    """Return the client API subject that creates the consumer reading `reply_subject`."""
    return f"{CLIENT_API_PREFIX}.CONSUMER.CREATE.{subjects.REPLIES_STREAM}.{reply_consumer_name(reply_subject)}.{reply_subject}"


def reply_consumer_delete_subject(reply_subject: str) -> str:
    return f"{CLIENT_API_PREFIX}.CONSUMER.DELETE.{subjects.REPLIES_STREAM}.{reply_consumer_name(reply_subject)}"


def reply_consumer_name(reply_subject: str) -> str:
    """Return the consumer name the account mapping forces: the subject's random token."""
    return reply_subject.split(".")[-2]


def _client_api(prefix: str) -> list[str]:
    return [f"{prefix}.{call}" for call in CLIENT_API_CALLS]


def relay_inbox_root(relay_name: str) -> str:
    return f"{RELAY_INBOX_ROOT}_{relay_name}"


def client_template(inbox_root: str = CLIENT_INBOX_ROOT) -> dict[str, Any]:
    """Permissions of a client scope, where {{subject()}} is each connection's own user nkey.

    The list has the $JS.API forms because nats-server checks a direct
    client's publish after the account mapping. A relay has no mapping, so
    it checks the client API forms.
    """
    return {
        "pub": {"allow": [subjects.JOBS_SUBJECT, *_client_api(CLIENT_API_PREFIX), *_client_api(JS_API_PREFIX)]},
        "sub": {"allow": [f"{inbox_root}.{SUBJECT_TEMPLATE}.>"]},
        "resp": RESPOND_ONCE,
    }


def worker() -> dict[str, Any]:
    """Permissions of the worker user: take jobs, publish replies, keep the pool key and document."""
    streams = (subjects.JOBS_STREAM, subjects.REPLIES_STREAM, KV_STREAM)
    consumer = f"{subjects.JOBS_STREAM}.{subjects.WORKERS_CONSUMER}"
    # Workers create and update the three streams so that a worker can start
    # on a fresh broker (topology.ensure_topology).
    stream_api = [f"$JS.API.STREAM.{verb}.{stream}" for verb in ("CREATE", "UPDATE", "INFO") for stream in streams]
    return {
        "pub": {
            "allow": [
                f"{subjects.REPLY_SUBJECT_PREFIX}.*.{subjects.REPLY_SUBJECT_SUFFIX}",
                *stream_api,
                f"$JS.API.CONSUMER.CREATE.{consumer}.{subjects.JOBS_SUBJECT}",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{consumer}",
                f"$JS.API.CONSUMER.INFO.{consumer}",
                f"$JS.API.CONSUMER.MSG.NEXT.{consumer}",
                f"$JS.ACK.{consumer}.>",
                f"$JS.API.STREAM.MSG.GET.{KV_STREAM}",
                ATTESTATION_SUBJECT,
                subjects.KEY_RELEASE_SUBJECT,
                *READ_RELEASE_LOG,
            ]
        },
        "sub": {"allow": [f"{WORKER_INBOX_PREFIX}.>", subjects.KEY_RELEASE_SUBJECT]},
        # A pool member responds once to each key release request.
        "resp": RESPOND_ONCE,
    }


def operator() -> dict[str, Any]:
    """Permissions of the operator user: read stream and consumer state and stored messages, change nothing."""
    return {
        "pub": {
            "allow": [
                "$JS.API.INFO",
                "$JS.API.STREAM.NAMES",
                "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.INFO.*",
                "$JS.API.STREAM.MSG.GET.*",
                "$JS.API.CONSUMER.NAMES.*",
                "$JS.API.CONSUMER.LIST.*",
                "$JS.API.CONSUMER.INFO.*.*",
            ]
        },
        "sub": {"allow": [f"{OPERATOR_INBOX_PREFIX}.>"]},
    }


def release() -> dict[str, Any]:
    """Permissions of the release log publisher: create the log bucket and write its keys."""
    return {
        "pub": {"allow": [f"$JS.API.STREAM.CREATE.{LOG_STREAM}", *READ_RELEASE_LOG, f"$KV.{LOG_BUCKET}.>"]},
        "sub": {"allow": [f"{RELEASE_INBOX_PREFIX}.>"]},
    }


def relay(relay_name: str) -> dict[str, Any]:
    """Permissions of a relay's leaf node connection: what its clients may do, for all of them together.

    The relay enforces each client's own template. The broker enforces this
    union on the leaf connection before its account mappings, so a relay
    has no right to the $JS.API subjects themselves, and receives only
    deliveries under its own clients' inbox root.
    """
    return {
        "pub": {"allow": [subjects.JOBS_SUBJECT, *_client_api(CLIENT_API_PREFIX), f"{FLOW_CONTROL_PREFIX}.>"]},
        "sub": {"allow": [f"{relay_inbox_root(relay_name)}.>"]},
        # The credential serves only as a leaf node connection, not as a client.
        "allowed_connection_types": ["LEAFNODE"],
    }
