"""nats-server configuration and the JetStream topology confide runs on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template

from confide.broker_config import permissions
from confide.broker_config.credentials import Authority


@dataclass(frozen=True)
class ServerTls:
    """The server certificate and key a broker or relay presents; clients are not asked for certificates."""

    cert: Path
    key: Path


def _template(name: str) -> Template:
    return Template(files(__package__).joinpath(name).read_text(encoding="utf-8"))


def _quote(value: str | Path) -> str:
    # A JSON string is a valid nats-server configuration string.
    return json.dumps(str(value))


def _tls_block(tls: ServerTls | None, indent: str = "") -> str:
    if tls is None:
        return ""
    lines = ["tls {", f"  cert_file: {_quote(tls.cert)}", f"  key_file: {_quote(tls.key)}", "  timeout: 5", "}"]
    return "\n".join(indent + line for line in lines)


def _authorization_block(authority: Authority | None) -> str:
    if authority is None:
        # No authentication: the test suite's brokers only. The account
        # mappings still apply, so clients call the API the same way.
        mappings = "\n".join(f"  {_quote(source)}: {_quote(destination)}" for source, destination in permissions.account_mappings().items())
        return f"mappings {{\n{mappings}\n}}"

    preload = "\n".join(f"  {account}: {_quote(token)}" for account, token in authority.resolver_preload().items())
    return "\n".join(
        [
            "# Operator mode: accounts and users are JWTs that confide's authority signed.",
            f"operator: {_quote(authority.operator_jwt())}",
            f"system_account: {authority.system_account.public_key}",
            "resolver: MEMORY",
            f"resolver_preload: {{\n{preload}\n}}",
        ]
    )


def render_server_config(
    host: str,
    port: int,
    store_dir: Path,
    *,
    authority: Authority | None = None,
    tls: ServerTls | None = None,
    leafnode_port: int | None = None,
    server_name: str = "confide",
) -> str:
    """Fill the broker configuration template.

    Without an authority the broker accepts any connection with full rights:
    the test suite uses that, `confide up` and production never do.
    """
    leafnodes = ""
    if leafnode_port is not None:
        leafnodes = "\n".join(["leafnodes {", f"  listen: {_quote(f'{host}:{leafnode_port}')}", _tls_block(tls, "  "), "}"])
    return _template("nats-server.conf").substitute(
        server_name=server_name,
        host=host,
        port=port,
        store_dir=str(store_dir),
        tls=_tls_block(tls),
        authorization=_authorization_block(authority),
        leafnodes=leafnodes,
    )


def render_relay_config(
    host: str,
    port: int,
    broker_leaf_url: str,
    relay_credentials: Path,
    account_jwts: dict[str, str],
    operator_jwt: str,
    system_account: str,
    account: str,
    *,
    tls: ServerTls | None = None,
    broker_ca: Path | None = None,
    server_name: str = "confide-relay",
) -> str:
    """Fill the relay configuration template: a leaf node of the broker at `broker_leaf_url`.

    The relay trusts the same operator and preloads the same account JWTs,
    which hold no secret, so it checks client credentials and applies each
    client's own permissions itself. `relay_credentials` is the relay's
    .creds file from the broker operator.
    """
    preload = "\n".join(f"  {name}: {_quote(token)}" for name, token in account_jwts.items())
    authorization = "\n".join(
        [
            f"operator: {_quote(operator_jwt)}",
            f"system_account: {system_account}",
            "resolver: MEMORY",
            f"resolver_preload: {{\n{preload}\n}}",
        ]
    )
    remote_tls = ""
    if broker_ca is not None:
        remote_tls = f"      tls {{\n        ca_file: {_quote(broker_ca)}\n      }}"
    return _template("relay.conf").substitute(
        server_name=server_name,
        host=host,
        port=port,
        tls=_tls_block(tls),
        authorization=authorization,
        broker_url=broker_leaf_url,
        account=account,
        credentials=str(relay_credentials),
        remote_tls=remote_tls,
    )
