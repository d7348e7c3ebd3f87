"""The project's one exception hierarchy.

Messages name the failed check and the value's size or kind, never its
content: exception text ends up in logs and terminals, so it must not carry a
prompt, a reply, a key or a reply token.
"""


class ConfideError(Exception):
    """Base class for every error confide raises on purpose."""


class LocalProtocolError(ConfideError):
    """This side was asked to build something the protocol does not allow."""


class EmptyPromptError(LocalProtocolError):
    def __init__(self) -> None:
        super().__init__("the prompt is empty: write some text, or pass '-' to read it from stdin")


class JobTooLargeError(LocalProtocolError):
    """A job exceeds a size limit; `measured` names what `size` and `limit` describe."""

    MEASURES = {
        "sealed job": "the sealed job is {size} bytes but the broker accepts at most {limit} bytes per message",
        "chat": "the chat is {size} bytes but the largest job padding bucket fits {limit} bytes",
        "message": "one message is {size} bytes but a job message may contain at most {limit} bytes",
    }

    def __init__(self, size: int, limit: int, measured: str = "sealed job") -> None:
        super().__init__(self.MEASURES[measured].format(size=size, limit=limit) + ": shorten the prompt or the chat history")
        self.size = size
        self.limit = limit


class RemoteProtocolError(ConfideError):
    """A peer sent bytes that break the protocol."""


class DecodeError(RemoteProtocolError):
    """A message failed to decode or validate; `reason` is a stable counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class AuthenticationError(RemoteProtocolError):
    """Opaque failure to open or verify a sealed, signed or encrypted value.

    It deliberately reveals nothing about which check failed, so callers count
    the reason themselves.
    """

    def __init__(self) -> None:
        super().__init__("message failed authentication")


class AttestationError(ConfideError):
    """The pool's attestation could not be verified, so nothing may be sealed to it."""


class TransparencyError(ConfideError):
    """A transparency log proof or tree head failed verification, or a log file is damaged."""


class TeeError(ConfideError):
    """The TEE interface of this machine could not produce an attestation report."""


class ReplyError(ConfideError):
    """The worker rejected the job with an authenticated error reply."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"the worker rejected the job ({code}): {detail}")
        self.code = code
        self.detail = detail


class ReplyIncompleteError(ConfideError):
    """The reply stopped before its final chunk arrived."""


class ReplyOrderError(RemoteProtocolError):
    """Reply chunks arrived out of order: the reply stream was tampered with."""


class BrokerError(ConfideError):
    """The broker could not be reached or refused an operation."""


class PoolJoinError(ConfideError):
    """A starting worker could not obtain the pool key, so it must not take jobs."""


class WorkerStartError(ConfideError):
    """A worker must not take jobs: its release cannot be proven or its setup is invalid."""


class KeyExpiredError(ConfideError):
    """A worker reported, with a signed notice, that the pool no longer has (or never had) the job's pool key."""
