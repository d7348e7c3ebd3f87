"""nats-server configuration and the JetStream topology confide runs on."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from string import Template


def render_server_config(host: str, port: int, store_dir: Path) -> str:
    """Fill the local nats-server configuration template."""
    template = Template(files(__package__).joinpath("nats-server.conf").read_text(encoding="utf-8"))
    return template.substitute(host=host, port=port, store_dir=str(store_dir))
