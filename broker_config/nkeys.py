"""NATS nkeys: Ed25519 keys written as base32 strings that name their role.

An encoded public key is base32(prefix || 32-byte key || CRC16), without
padding. The first character names the role (O operator, A account, U user).
A seed adds a second prefix byte so it starts with "S" and the role letter
("SO", "SA", "SU"). The CRC is CRC-16/XMODEM, stored little-endian. This
follows the nkeys format of nats-io/nkeys (Go) that nats-server verifies.
Signing uses schemas.crypto, the one module that calls PyNaCl.
"""

from __future__ import annotations

import base64
import binascii
import enum
import struct

from confide.schemas import crypto

SEED_PREFIX = 18 << 3
RAW_KEY_SIZE = 32


class Role(enum.IntEnum):
    """The role prefix byte of an nkey."""

    OPERATOR = 14 << 3
    ACCOUNT = 0
    USER = 20 << 3


class InvalidNkeyError(ValueError):
    """A string is not a well-formed nkey of the expected role."""


def _crc16(data: bytes) -> bytes:
    return struct.pack("<H", binascii.crc_hqx(data, 0))


def _encode(raw: bytes) -> str:
    return base64.b32encode(raw + _crc16(raw)).decode("ascii").rstrip("=")


def _decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 8)
    try:
        raw = base64.b32decode(padded.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidNkeyError("the nkey is not valid base32") from None
    if len(raw) < 3 or _crc16(raw[:-2]) != raw[-2:]:
        raise InvalidNkeyError("the nkey's checksum does not match")
    return raw[:-2]


def encode_public(role: Role, public: bytes) -> str:
    if len(public) != RAW_KEY_SIZE:
        raise ValueError(f"a public key must be {RAW_KEY_SIZE} bytes, got {len(public)}")

    return _encode(bytes([role]) + public)


def decode_public(role: Role, text: str) -> bytes:
    raw = _decode(text)
    if len(raw) != 1 + RAW_KEY_SIZE or raw[0] != role:
        raise InvalidNkeyError(f"the nkey is not a {role.name.lower()} public key")
    return raw[1:]


def encode_seed(role: Role, seed: bytes) -> str:
    if len(seed) != RAW_KEY_SIZE:
        raise ValueError(f"a seed must be {RAW_KEY_SIZE} bytes, got {len(seed)}")

    prefix = bytes([SEED_PREFIX | (role >> 5), (role & 0x1F) << 3])
    return _encode(prefix + seed)


def decode_seed(text: str) -> tuple[Role, bytes]:
    raw = _decode(text)
    if len(raw) != 2 + RAW_KEY_SIZE or raw[0] & 0xF8 != SEED_PREFIX:
        raise InvalidNkeyError("the nkey is not a seed")
    try:
        role = Role(((raw[0] & 0x07) << 5) | (raw[1] >> 3))
    except ValueError:
        raise InvalidNkeyError("the seed's role is not operator, account or user") from None
    return role, raw[2:]


class KeyPair:
    """An nkey pair; its repr shows the public key only, never the seed."""

    __slots__ = ("role", "_signing_key")

    def __init__(self, role: Role, seed: bytes) -> None:
        self.role = role
        self._signing_key = crypto.SigningKey(seed)

    @classmethod
    def generate(cls, role: Role) -> KeyPair:
        return cls(role, crypto.random_bytes(RAW_KEY_SIZE))

    @classmethod
    def from_seed(cls, text: str, role: Role | None = None) -> KeyPair:
        found, seed = decode_seed(text.strip())
        if role is not None and found != role:
            raise InvalidNkeyError(f"expected a {role.name.lower()} seed, got a {found.name.lower()} seed")
        return cls(found, seed)

    @property
    def public_key(self) -> str:
        return encode_public(self.role, self._signing_key.verify_key)

    @property
    def seed(self) -> str:
        return encode_seed(self.role, self._signing_key.seed)

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message)

    def __repr__(self) -> str:
        return f"KeyPair({self.role.name.lower()}, {self.public_key})"
