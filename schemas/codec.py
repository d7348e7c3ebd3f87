"""msgpack encoding with explicit limits, and the field checks every decoder shares.

Every message from the network is decoded exactly once, here, with limits on
the buffer and on every string, binary, array and map. Extension types and
timestamps are rejected, strings must be strict UTF-8 and map keys must be
strings from a fixed set, each at most once. Anything else raises DecodeError with a stable
`reason` that the caller counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from confide.errors import DecodeError

MAX_STRING = 256 * 1024
MAX_BINARY = 1024 * 1024
MAX_ARRAY = 1024
MAX_MAP = 32


def encode(value: Any) -> bytes:
    """Encode with the canonical settings: str as msgpack str, bytes as bin."""
    return msgpack.packb(value, use_bin_type=True)


def decode(data: bytes, max_size: int) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("not_bytes", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError("oversized", f"{len(data)} bytes exceeds the {max_size}-byte limit")
    if len(data) == 0:
        raise DecodeError("empty", "the message has no bytes")

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=min(MAX_STRING, max_size),
            max_bin_len=min(MAX_BINARY, max_size),
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
            max_ext_len=0,
            ext_hook=_reject_extension,
            object_pairs_hook=_map_without_duplicate_keys,
            unicode_errors="strict",
        )
    except msgpack.ExtraData:
        raise DecodeError("trailing_bytes", "bytes follow the message") from None
    except UnicodeDecodeError:
        raise DecodeError("invalid_utf8", "a string is not valid UTF-8") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise DecodeError("malformed", f"not valid msgpack within limits ({type(exc).__name__})") from None


def _reject_extension(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not allowed")


def _map_without_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # msgpack-python keeps the last of two equal keys and other decoders may
    # keep the first, so two peers could read different values from one
    # signed attestation body.
    value = dict(pairs)
    if len(value) != len(pairs):
        raise DecodeError("duplicate_key", "a map has the same key twice")
    return value


class Fields:
    """Typed access to a decoded msgpack map with a fixed key set.

    With `version` set, the map's "v" field is checked before its keys, so a
    message from a newer peer is reported as unsupported_version rather than
    as a schema mismatch.
    """

    def __init__(
        self,
        value: Any,
        message: str,
        required: set[str],
        optional: frozenset[str] = frozenset(),
        version: int | None = None,
    ) -> None:
        if not isinstance(value, Mapping):
            raise DecodeError("wrong_type", f"{message} must be a map")
        if version is not None:
            _check_version(value, message, version)

        keys = set(value)
        missing = required - keys
        if missing:
            raise DecodeError("missing_field", f"{message} lacks {sorted(missing)}")
        unknown = keys - required - optional
        if unknown:
            # Only key names we defined are echoed, so the count suffices here.
            raise DecodeError("unknown_field", f"{message} has {len(unknown)} field(s) not in its schema")

        self._value = value
        self._message = message

    def has(self, key: str) -> bool:
        return key in self._value

    def integer(self, key: str, minimum: int = 0, maximum: int = 2**64 - 1) -> int:
        value = self._value[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError("wrong_type", f"{self._message}.{key} must be an integer")
        if not minimum <= value <= maximum:
            raise DecodeError("out_of_range", f"{self._message}.{key} must be in [{minimum}, {maximum}], got {value}")
        return value

    def number(self, key: str, minimum: float, maximum: float) -> float:
        value = self._value[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DecodeError("wrong_type", f"{self._message}.{key} must be a number")
        if not minimum <= value <= maximum:  # also rejects NaN
            raise DecodeError("out_of_range", f"{self._message}.{key} must be in [{minimum}, {maximum}]")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._value[key]
        if not isinstance(value, bool):
            raise DecodeError("wrong_type", f"{self._message}.{key} must be a boolean")
        return value

    def binary(self, key: str, size: int | None = None, min_size: int = 0, max_size: int = MAX_BINARY) -> bytes:
        value = self._value[key]
        if not isinstance(value, bytes):
            raise DecodeError("wrong_type", f"{self._message}.{key} must be binary")
        if size is not None and len(value) != size:
            raise DecodeError("wrong_size", f"{self._message}.{key} must be {size} bytes, got {len(value)}")
        if not min_size <= len(value) <= max_size:
            raise DecodeError("wrong_size", f"{self._message}.{key} must be {min_size} to {max_size} bytes, got {len(value)}")
        return value

    def string(self, key: str, max_size: int = MAX_STRING, choices: frozenset[str] | None = None) -> str:
        value = self._value[key]
        if not isinstance(value, str):
            raise DecodeError("wrong_type", f"{self._message}.{key} must be a string")
        if len(value.encode("utf-8", "surrogatepass")) > max_size:
            raise DecodeError("oversized", f"{self._message}.{key} exceeds {max_size} bytes")
        if choices is not None and value not in choices:
            raise DecodeError("unknown_value", f"{self._message}.{key} is not one of {sorted(choices)}")
        return value

    def array(self, key: str, max_items: int = MAX_ARRAY) -> list[Any]:
        value = self._value[key]
        if not isinstance(value, list):
            raise DecodeError("wrong_type", f"{self._message}.{key} must be an array")
        if len(value) > max_items:
            raise DecodeError("oversized", f"{self._message}.{key} has more than {max_items} items")
        return value

    def raw(self, key: str) -> Any:
        return self._value[key]


def _check_version(value: Mapping[str, Any], message: str, supported: int) -> None:
    if "v" not in value:
        raise DecodeError("missing_field", f"{message} lacks ['v']")
    version = value["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise DecodeError("wrong_type", f"{message}.v must be an integer")
    if version != supported:
        raise DecodeError("unsupported_version", f"{message} version {version} is not supported (this peer speaks {supported})")
