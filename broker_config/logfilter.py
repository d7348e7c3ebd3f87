"""Copy nats-server's log from stdin to a file with every IP address removed.

nats-server starts each line it logs about a connection with the peer's
address and port (permission violations, slow consumers, TLS and
authentication failures, leaf node connections). No option turns that off,
so confide runs the server's output through this filter:

    nats-server -c broker.conf 2>&1 | python -m confide.broker_config.logfilter broker.log

Addresses become "[address]"; the rest of each line is kept. The trade-off:
the operator cannot trace an error back to a client address, by design.
The filter must outlive the server: Go programs exit on a write to a closed
stdout pipe.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import BinaryIO

REDACTED = b"[address]"

_PORT = rb"(?::\d{1,5})?"
_IPV4 = rb"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}" + _PORT + rb"(?![\w.])"
# "[v6]:port" as Go's net.JoinHostPort writes it, then bare forms: eight
# groups, or any form with "::". A time of day such as 20:14:12 has neither.
_ZONE = rb"(?:%[\w.]+)?"
_IPV6_BRACKETED = rb"\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*" + _ZONE + rb"\]" + _PORT
_HEX = rb"[0-9A-Fa-f]{1,4}"
_IPV6_FULL = rb"(?<![\w:.])(?:" + _HEX + rb":){7}" + _HEX + rb"(?![\w:])"
_IPV6_COMPRESSED = rb"(?<![\w:.])(?:" + _HEX + rb"(?::" + _HEX + rb")*)?::(?:" + _HEX + rb"(?::" + _HEX + rb")*)?(?:\.\d{1,3}){0,3}" + _ZONE + rb"(?![\w:])"
ADDRESS = re.compile(b"|".join([_IPV6_BRACKETED, _IPV6_FULL, _IPV6_COMPRESSED, _IPV4]))


def redact(line: bytes) -> bytes:
    """Return `line` with each IPv4 or IPv6 address, and the port after it, replaced."""
    return ADDRESS.sub(REDACTED, line)


def copy_redacted(source: BinaryIO, destination: BinaryIO) -> None:
    """Copy lines until end of input, flushing each so the log is current."""
    for line in source:
        destination.write(redact(line))
        destination.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m confide.broker_config.logfilter LOG_FILE  (reads the log from stdin)", file=sys.stderr)
        return 2

    with Path(argv[0]).open("ab") as output:
        copy_redacted(sys.stdin.buffer, output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
