"""Broker trust in NATS operator mode, and the credential files each role connects with.

The Authority contains the signing keys: the operator's, the system account's
(unused by anyone, so no connection can read server events), confide's
account, and the client scope's signing key. It issues:

- the JWTs that the broker configuration preloads;
- `.creds` files (a user JWT and its nkey seed, the standard NATS format) for
  workers, the operator, relays and the release log publisher;
- the one client credential that all clients share. It contains the scoped
  signing key, with which every client connection signs a JWT for a fresh
  user nkey, so no two connections share an inbox namespace and no
  connection is tied to a person. Each relay's clients share a credential
  of their own, with its own scope and inbox root.

Every file with a seed is written readable by its owner only.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from confide.broker_config import jwt, permissions
from confide.broker_config.nkeys import InvalidNkeyError, KeyPair, Role, decode_public

ACCOUNT_NAME = "CONFIDE"
SYSTEM_ACCOUNT_NAME = "SYS"
CLIENT_SCOPE_ROLE = "client"
CLIENT_CREDENTIAL_KIND = "confide-client"
# A relay name becomes part of subjects, so it is one plain token.
RELAY_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")

JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
JWT_END = "------END NATS USER JWT------"
SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"
SEED_END = "------END USER NKEY SEED------"


class CredentialsError(ValueError):
    """A credential file is missing, unreadable or not in a known format."""


def write_secret(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by the owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


def format_creds(user_jwt: str, seed: str) -> str:
    return (
        f"{JWT_BEGIN}\n{user_jwt}\n{JWT_END}\n\n"
        "The seed below proves this user's identity to the broker: keep the file secret.\n\n"
        f"{SEED_BEGIN}\n{seed}\n{SEED_END}\n"
    )


@dataclass(frozen=True, repr=False)
class Authority:
    operator: KeyPair
    system_account: KeyPair
    account: KeyPair
    client_signer: KeyPair
    # Relay name to the scope signing key of that relay's clients.
    relay_signers: dict[str, KeyPair] = field(default_factory=dict)

    @classmethod
    def generate(cls) -> Authority:
        return cls(
            KeyPair.generate(Role.OPERATOR),
            KeyPair.generate(Role.ACCOUNT),
            KeyPair.generate(Role.ACCOUNT),
            KeyPair.generate(Role.ACCOUNT),
        )

    @classmethod
    def load(cls, path: Path) -> Authority:
        try:
            seeds = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                KeyPair.from_seed(seeds["operator"], Role.OPERATOR),
                KeyPair.from_seed(seeds["system_account"], Role.ACCOUNT),
                KeyPair.from_seed(seeds["account"], Role.ACCOUNT),
                KeyPair.from_seed(seeds["client_signer"], Role.ACCOUNT),
                {name: KeyPair.from_seed(seed, Role.ACCOUNT) for name, seed in seeds.get("relay_signers", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CredentialsError(f"cannot read the broker authority {path}: {type(exc).__name__}") from None

    def save(self, path: Path) -> None:
        seeds = {
            "operator": self.operator.seed,
            "system_account": self.system_account.seed,
            "account": self.account.seed,
            "client_signer": self.client_signer.seed,
            "relay_signers": {name: signer.seed for name, signer in self.relay_signers.items()},
        }
        write_secret(path, json.dumps(seeds, indent=2) + "\n")

    def add_relay(self, name: str) -> None:
        """Add a scope for a relay's clients, unless the relay has one; the account JWT changes with it."""
        if not RELAY_NAME.fullmatch(name):
            raise CredentialsError(f"invalid relay name {name!r}: use 1 to 32 letters, digits, '-' or '_'")
        if name not in self.relay_signers:
            self.relay_signers[name] = KeyPair.generate(Role.ACCOUNT)

    def operator_jwt(self) -> str:
        return jwt.encode(jwt.operator_claims(self.operator, "confide", self.system_account.public_key), self.operator)

    def system_account_jwt(self) -> str:
        return jwt.encode(jwt.account_claims(self.system_account.public_key, SYSTEM_ACCOUNT_NAME, jetstream=False), self.operator)

    def account_jwt(self, relay: bool = False) -> str:
        """Return confide's account JWT; a relay's copy has no JetStream and no mappings (see relay_preload)."""
        scopes = [jwt.user_scope(self.client_signer.public_key, CLIENT_SCOPE_ROLE, permissions.client_template())]
        for name, signer in sorted(self.relay_signers.items()):
            template = permissions.client_template(permissions.relay_inbox_root(name))
            scopes.append(jwt.user_scope(signer.public_key, f"{CLIENT_SCOPE_ROLE}-{name}", template))
        claims = jwt.account_claims(
            self.account.public_key,
            ACCOUNT_NAME,
            jetstream=not relay,
            signing_keys=scopes,
            mappings=None if relay else permissions.account_mappings(),
        )
        return jwt.encode(claims, self.operator)

    def resolver_preload(self) -> dict[str, str]:
        """Account public key to account JWT, for the broker's memory resolver."""
        return {
            self.system_account.public_key: self.system_account_jwt(),
            self.account.public_key: self.account_jwt(),
        }

    def relay_preload(self) -> dict[str, str]:
        """Account JWTs for a relay: the same account and client scope, without JetStream or mappings.

        The relay forwards client API requests unchanged, so the broker
        applies the mappings and checks the relay's own permissions first.
        """
        return {
            self.system_account.public_key: self.system_account_jwt(),
            self.account.public_key: self.account_jwt(relay=True),
        }

    def user_creds(self, name: str, user_permissions: dict[str, Any]) -> str:
        """Return a .creds file for a new user of confide's account with `user_permissions`."""
        user = KeyPair.generate(Role.USER)
        token = jwt.encode(jwt.user_claims(user.public_key, name, None, user_permissions), self.account)
        return format_creds(token, user.seed)

    def client_credential(self, relay_name: str | None = None) -> str:
        """Return a shared client credential file: the account, a client scope's signing key and its inbox root.

        With `relay_name`, the credential is for the clients of that relay.
        """
        signer, inbox_root = self.client_signer, permissions.CLIENT_INBOX_ROOT
        if relay_name is not None:
            signer, inbox_root = self.relay_signers[relay_name], permissions.relay_inbox_root(relay_name)
        body = {"kind": CLIENT_CREDENTIAL_KIND, "account": self.account.public_key, "signing_key": signer.seed, "inbox_root": inbox_root}
        return json.dumps(body, indent=2) + "\n"

    def relay_creds(self, relay_name: str) -> str:
        """Return the .creds file of a relay's leaf node connection."""
        return self.user_creds(f"confide-relay-{relay_name}", permissions.relay(relay_name))


@dataclass(frozen=True)
class LocalCredentials:
    """The credential files of a local broker, all under one directory."""

    directory: Path

    @property
    def authority(self) -> Path:
        return self.directory / "authority.json"

    @property
    def client(self) -> Path:
        return self.directory / "client.creds"

    @property
    def worker(self) -> Path:
        return self.directory / "worker.creds"

    @property
    def operator(self) -> Path:
        return self.directory / "operator.creds"

    def relay(self, name: str) -> Path:
        """Return the path of relay `name`'s .creds file, for its leaf node connection."""
        return self.directory / f"relay-{name}.creds"

    def relay_client(self, name: str) -> Path:
        """Return the path of the client credential that relay `name`'s clients share."""
        return self.directory / f"relay-{name}-client.creds"

    @property
    def release(self) -> Path:
        return self.directory / "release.creds"

    def create(self) -> Authority:
        """Issue a new authority and every role's credential file; replace any earlier ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        authority = Authority.generate()
        authority.save(self.authority)
        self._issue(authority, replace=True)
        return authority

    def load_or_create(self) -> Authority:
        """Load the authority if one exists, issuing only missing files; otherwise create everything.

        Keeping the authority keeps the account, and with it the streams
        that JetStream stores under the account's name.
        """
        if not self.authority.is_file():
            return self.create()
        authority = Authority.load(self.authority)
        self._issue(authority, replace=False)
        return authority

    def add_relay(self, name: str) -> Authority:
        """Give relay `name` its scope and credential files, keeping them if it has them.

        The account JWT changes, so the broker needs its configuration
        rendered again and a restart before the relay's clients can connect.
        """
        authority = self.load_or_create()
        authority.add_relay(name)
        authority.save(self.authority)
        if not self.relay(name).is_file():
            write_secret(self.relay(name), authority.relay_creds(name))
        write_secret(self.relay_client(name), authority.client_credential(name))
        return authority

    def _issue(self, authority: Authority, replace: bool) -> None:
        files = {
            self.client: authority.client_credential,
            self.worker: lambda: authority.user_creds("confide-worker", permissions.worker()),
            self.operator: lambda: authority.user_creds("confide-operator", permissions.operator()),
            self.release: lambda: authority.user_creds("confide-release", permissions.release()),
        }
        for path, issue in files.items():
            if replace or not path.is_file():
                write_secret(path, issue())


# -- the connecting side ---------------------------------------------------------------


JwtCallback = Callable[[], bytes]
SignatureCallback = Callable[[str], bytes]


def _signature_callback(user: KeyPair) -> SignatureCallback:
    # nats-py sends what this returns as the CONNECT "sig": the server nonce
    # signed with the user nkey, base64-encoded.
    def sign(nonce: str) -> bytes:
        return base64.b64encode(user.sign(nonce.encode("ascii")))

    return sign


@dataclass(frozen=True, repr=False)
class UserCredentials:
    """A user JWT and its nkey, read from a .creds file."""

    user_jwt: str
    user: KeyPair

    def connect_options(self, inbox_prefix: str) -> dict[str, Any]:
        """Return the nats.connect arguments that authenticate as this user."""
        token = self.user_jwt.encode("ascii")
        return {"user_jwt_cb": lambda: token, "signature_cb": _signature_callback(self.user), "inbox_prefix": inbox_prefix}

    def __repr__(self) -> str:
        return f"UserCredentials({self.user.public_key})"


@dataclass(frozen=True, repr=False)
class ClientCredential:
    """A shared client credential: it signs a JWT for a fresh user nkey on every connection."""

    account: str
    signer: KeyPair
    inbox_root: str = permissions.CLIENT_INBOX_ROOT

    def connect_options(self) -> dict[str, Any]:
        """Return nats.connect arguments for a new connection with its own user nkey and inbox prefix.

        The same nkey is used on every reconnect of that connection, so its
        inbox prefix, and the subscriptions under it, stay valid.
        """
        user = KeyPair.generate(Role.USER)
        token = jwt.encode(jwt.user_claims(user.public_key, "confide-client", self.account, None), self.signer).encode("ascii")
        return {
            "user_jwt_cb": lambda: token,
            "signature_cb": _signature_callback(user),
            "inbox_prefix": f"{self.inbox_root}.{user.public_key}",
        }

    def __repr__(self) -> str:
        return f"ClientCredential(account={self.account})"


def load_credentials(path: Path) -> UserCredentials | ClientCredential:
    """Read a .creds file or a confide client credential; raise CredentialsError if it is neither."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialsError(f"cannot read the credential file {path}: {exc.strerror}") from None

    try:
        if text.lstrip().startswith("{"):
            return _parse_client_credential(text)
        return _parse_creds(text)
    except (ValueError, KeyError, TypeError, InvalidNkeyError):
        raise CredentialsError(
            f"{path} is neither a NATS .creds file nor a confide client credential; "
            "use a file that 'confide up' wrote to its state directory or that the broker operator issued"
        ) from None


def _parse_client_credential(text: str) -> ClientCredential:
    body = json.loads(text)
    if body["kind"] != CLIENT_CREDENTIAL_KIND:
        raise ValueError("not a client credential")
    decode_public(Role.ACCOUNT, body["account"])
    inbox_root = body.get("inbox_root", permissions.CLIENT_INBOX_ROOT)
    if inbox_root != permissions.CLIENT_INBOX_ROOT and not inbox_root.startswith(f"{permissions.RELAY_INBOX_ROOT}_"):
        raise ValueError("unknown inbox root")
    return ClientCredential(body["account"], KeyPair.from_seed(body["signing_key"], Role.ACCOUNT), inbox_root)


def _parse_creds(text: str) -> UserCredentials:
    lines = [line.strip() for line in text.splitlines()]
    user_jwt = lines[lines.index(JWT_BEGIN) + 1]
    seed = lines[lines.index(SEED_BEGIN) + 1]
    jwt.decode_unverified(user_jwt)
    return UserCredentials(user_jwt, KeyPair.from_seed(seed, Role.USER))


def load_user_credentials(path: Path) -> UserCredentials:
    """Read a .creds file; raise CredentialsError for anything else, the client credential included."""
    credentials = load_credentials(path)
    if not isinstance(credentials, UserCredentials):
        raise CredentialsError(f"{path} is the client credential; this role needs its own .creds file")
    return credentials


def load_client_credential(path: Path) -> ClientCredential:
    """Read the shared client credential; raise CredentialsError for anything else."""
    credentials = load_credentials(path)
    if not isinstance(credentials, ClientCredential):
        raise CredentialsError(f"{path} is a user .creds file; clients need the client credential ('client.creds')")
    return credentials


def tls_context(ca_file: Path) -> ssl.SSLContext:
    """Return a TLS context that trusts only the CA in `ca_file` and checks the broker's host name."""
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot read the CA file {ca_file}: {exc}") from None
