"""`confide audit`: what the broker holds, as its operator sees it.

The operator user may read stream and consumer state and stored messages but
change nothing (broker_config/permissions.py). This module reads every
stream the account has and summarizes it: message counts and bytes, each
subject with its count, the header names on stored messages, and how many
messages have each size. The point is what is absent: no plaintext, no
address, no name; the subjects carry only random tokens and the sizes are
padding buckets.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS

# At most this many messages are read per stream; the counts and subjects
# come from the stream's own state and are always complete.
MAX_MESSAGES_READ = 10_000
API_TIMEOUT_S = 5.0
SUBJECTS_SHOWN = 20


@dataclass
class StreamAudit:
    name: str
    messages: int
    bytes: int
    subjects: dict[str, int]
    consumers: list[str]
    sizes: Counter[int] = field(default_factory=Counter)
    header_names: Counter[str] = field(default_factory=Counter)
    messages_read: int = 0
    text_payloads: int = 0


async def audit_broker(nc: NATS) -> list[StreamAudit]:
    """Read every stream of the account; raise nats.errors.Error on a broker failure."""
    js = nc.jetstream(timeout=API_TIMEOUT_S)
    names = sorted(info.config.name for info in await js.streams_info())
    audits = []
    for name in names:
        info = await js.stream_info(name, subjects_filter=">")
        consumers = sorted(consumer.name for consumer in await js.consumers_info(name))
        audit = StreamAudit(name, info.state.messages, info.state.bytes, dict(info.state.subjects or {}), consumers)
        await _read_messages(nc, audit, info.state.first_seq, info.state.last_seq)
        audits.append(audit)
    return audits


async def _read_messages(nc: NATS, audit: StreamAudit, first: int, last: int) -> None:
    sequence = first
    while sequence and sequence <= last and audit.messages_read < MAX_MESSAGES_READ:
        request = json.dumps({"seq": sequence, "next_by_subj": ">"}).encode()
        response = json.loads((await nc.request(f"$JS.API.STREAM.MSG.GET.{audit.name}", request, timeout=API_TIMEOUT_S)).data)
        message = response.get("message")
        if message is None:
            return
        payload = _b64(message.get("data"))
        audit.messages_read += 1
        audit.sizes[len(payload)] += 1
        audit.text_payloads += _is_text(payload)
        for name in _header_names(_b64(message.get("hdrs"))):
            audit.header_names[name] += 1
        sequence = int(message["seq"]) + 1


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _header_names(block: bytes) -> list[str]:
    # A NATS header block is "NATS/1.0" then "Name: value" lines.
    lines = block.decode("utf-8", "replace").split("\r\n")[1:]
    return [line.split(":", 1)[0] for line in lines if ":" in line]


def _is_text(payload: bytes) -> bool:
    """Return whether `payload` is printable UTF-8, as plaintext would be and ciphertext is not."""
    if not payload:
        return False
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text.isprintable()


def format_audit(audits: list[StreamAudit]) -> str:
    lines = []
    for audit in audits:
        lines.append(f"stream {audit.name}: {audit.messages} messages, {audit.bytes} bytes, {len(audit.subjects)} subjects")
        for subject, count in sorted(audit.subjects.items())[:SUBJECTS_SHOWN]:
            lines.append(f"  subject {subject}: {count}")
        if len(audit.subjects) > SUBJECTS_SHOWN:
            lines.append(f"  ... and {len(audit.subjects) - SUBJECTS_SHOWN} more subjects")
        lines.append(f"  consumers: {', '.join(audit.consumers) or 'none'}")
        headers = ", ".join(f"{name} ({count})" for name, count in sorted(audit.header_names.items())) or "none"
        lines.append(f"  headers on stored messages: {headers}")
        sizes = ", ".join(f"{size} B x{count}" for size, count in sorted(audit.sizes.items())) or "none"
        lines.append(f"  payload sizes: {sizes}")
        lines.append(f"  payloads that read as text: {audit.text_payloads} of {audit.messages_read} read")
    return "\n".join(lines)
