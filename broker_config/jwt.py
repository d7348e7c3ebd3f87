"""NATS JWTs: the operator, account and user claims that nats-server trusts in operator mode.

A NATS JWT is a JWS with header {"typ": "JWT", "alg": "ed25519-nkey"}: the
base64url (unpadded) header and claims joined by "." and signed with the
issuer's nkey (Ed25519). Claim names follow nats-io/jwt v2, the library
nats-server decodes them with: "iss" and "sub" are nkey public keys and
"nats" contains the typed body with "type" and "version": 2.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

from confide.broker_config.nkeys import KeyPair

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
CLAIMS_VERSION = 2

# -1 is "no limit" in nats-io/jwt. JetStream is enabled for an account whose
# memory or disk storage limit is not zero.
UNLIMITED_ACCOUNT = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}
# Connection limits of a user whose permissions are set in its own JWT.
UNLIMITED_USER = {"subs": -1, "data": -1, "payload": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def encode(claims: dict[str, Any], issuer: KeyPair) -> str:
    """Sign `claims` with `issuer`, adding the issuer, the issue time and a unique id."""
    body = {**claims, "iss": issuer.public_key, "iat": int(time.time())}
    body.pop("jti", None)
    # nats-io/jwt names a JWT by a hash of its claims; nats-server does not check it.
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode("ascii").rstrip("=")

    signing_input = _b64(json.dumps(HEADER).encode()) + "." + _b64(json.dumps(body).encode())
    return signing_input + "." + _b64(issuer.sign(signing_input.encode("ascii")))


def decode_unverified(token: str) -> dict[str, Any]:
    """Return a JWT's claims without checking its signature: for display and tests only."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        raise ValueError("the text is not a NATS JWT") from None


def operator_claims(operator: KeyPair, name: str, system_account: str) -> dict[str, Any]:
    return {
        "sub": operator.public_key,
        "name": name,
        "nats": {"system_account": system_account, "type": "operator", "version": CLAIMS_VERSION},
    }


def account_claims(
    account: str,
    name: str,
    *,
    jetstream: bool,
    signing_keys: list[dict[str, Any]] | None = None,
    mappings: dict[str, str] | None = None,
) -> dict[str, Any]:
    limits = dict(UNLIMITED_ACCOUNT)
    if not jetstream:
        limits.update(mem_storage=0, disk_storage=0, streams=0, consumer=0)
    body: dict[str, Any] = {
        "limits": limits,
        "default_permissions": {"pub": {}, "sub": {}},
        "type": "account",
        "version": CLAIMS_VERSION,
    }
    if signing_keys:
        body["signing_keys"] = signing_keys
    if mappings:
        body["mappings"] = {source: [{"subject": destination, "weight": 100}] for source, destination in mappings.items()}
    return {"sub": account, "name": name, "nats": body}


def user_scope(signing_key: str, role: str, permissions: dict[str, Any]) -> dict[str, Any]:
    """Return a scoped signing key entry: every user it signs gets `permissions`, with templates expanded per user."""
    return {"kind": "user_scope", "key": signing_key, "role": role, "template": {**permissions, **UNLIMITED_USER}}


def user_claims(user: str, name: str, issuer_account: str | None, permissions: dict[str, Any] | None) -> dict[str, Any]:
    """Claims of a user.

    `issuer_account` is the account's public key when a signing key, not the
    account's own key, signs the JWT. `permissions` is None for a user signed
    by a scoped key, which must carry none of its own.
    """
    body: dict[str, Any] = {"type": "user", "version": CLAIMS_VERSION}
    if issuer_account is not None:
        body["issuer_account"] = issuer_account
    if permissions is not None:
        body.update(permissions, **UNLIMITED_USER)
    return {"sub": user, "name": name, "nats": body}
