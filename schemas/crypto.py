"""The crypto core: the only module in confide that calls PyNaCl.

Every construction is a libsodium primitive used as documented, so a client
in another language reproduces it with any libsodium binding:

- sealing a job: crypto_box_seal (X25519, XSalsa20-Poly1305, with the nonce
  BLAKE2b-192(ephemeral_pk || recipient_pk));
- padding: sodium_pad / sodium_unpad (ISO/IEC 7816-4);
- the reply key schedule: crypto_scalarmult (X25519) and keyed BLAKE2b-256
  with a 16-byte personalization string as a KDF, the way crypto_kdf does;
- reply chunks: crypto_aead_xchacha20poly1305_ietf with a zero nonce, safe
  because every chunk key encrypts exactly one message;
- attestation signatures: crypto_sign_detached (Ed25519).

Failures to open, decrypt or verify raise the one opaque AuthenticationError.
"""

from __future__ import annotations

import hmac

import nacl.bindings as sodium
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.utils

from confide.errors import AuthenticationError

KEY_SIZE = 32
SEAL_OVERHEAD = sodium.crypto_box_SEALBYTES
SIGNATURE_SIZE = 64
AEAD_TAG_SIZE = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
AEAD_ZERO_NONCE = bytes(sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)
PERSON_SIZE = 16
FINGERPRINT_SIZE = 8


def random_bytes(size: int) -> bytes:
    return nacl.utils.random(size)


class KeyPair:
    """An X25519 key pair whose repr shows a fingerprint of the public key only."""

    __slots__ = ("public", "_secret")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes):
            raise TypeError("secret key must be bytes")
        if len(secret) != KEY_SIZE:
            raise ValueError(f"secret key must be {KEY_SIZE} bytes, got {len(secret)}")

        self._secret = bytearray(secret)
        self.public = sodium.crypto_scalarmult_base(secret)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(random_bytes(KEY_SIZE))

    @property
    def secret(self) -> bytes:
        return bytes(self._secret)

    def erase(self) -> None:
        """Overwrite the secret key in place.

        NOTE: CPython may still hold copies made by `bytes()` calls; this
        shortens the key's lifetime but cannot guarantee no copy remains.
        """
        for i in range(len(self._secret)):
            self._secret[i] = 0

    def __repr__(self) -> str:
        return f"KeyPair(public={fingerprint(self.public)})"


def fingerprint(public: bytes) -> str:
    """Return a short hex name for a public value, safe to log."""
    return nacl.hash.blake2b(public, digest_size=FINGERPRINT_SIZE, encoder=nacl.encoding.RawEncoder).hex()


def seal(plaintext: bytes, recipient_public: bytes) -> bytes:
    _check_key(recipient_public, "recipient public key")

    return sodium.crypto_box_seal(plaintext, recipient_public)


def seal_with_ephemeral(plaintext: bytes, recipient_public: bytes, ephemeral_secret: bytes) -> bytes:
    """Build crypto_box_seal's output with a chosen ephemeral key.

    Only test vectors use this: libsodium draws the ephemeral key itself.
    The layout is ephemeral_pk || crypto_box(m, nonce, recipient_pk, ephemeral_sk)
    with nonce = BLAKE2b-192(ephemeral_pk || recipient_pk), as in libsodium's
    crypto_box_seal.
    """
    _check_key(recipient_public, "recipient public key")
    _check_key(ephemeral_secret, "ephemeral secret key")

    ephemeral_public = sodium.crypto_scalarmult_base(ephemeral_secret)
    nonce = nacl.hash.blake2b(
        ephemeral_public + recipient_public,
        digest_size=sodium.crypto_box_NONCEBYTES,
        encoder=nacl.encoding.RawEncoder,
    )
    boxed = sodium.crypto_box(plaintext, nonce, recipient_public, ephemeral_secret)
    return ephemeral_public + boxed


def unseal(sealed: bytes, keys: KeyPair) -> bytes:
    if len(sealed) < SEAL_OVERHEAD:
        raise AuthenticationError()

    try:
        return sodium.crypto_box_seal_open(sealed, keys.public, keys.secret)
    except nacl.exceptions.CryptoError:
        raise AuthenticationError() from None


def pad(data: bytes, bucket: int) -> bytes:
    """Pad with sodium_pad (ISO/IEC 7816-4) to exactly `bucket` bytes."""
    if len(data) >= bucket:
        raise ValueError(f"{len(data)} bytes do not fit a {bucket}-byte bucket with padding")

    padded = sodium.sodium_pad(data, bucket)
    assert len(padded) == bucket  # sodium_pad rounds up to a multiple of bucket
    return padded


def unpad(padded: bytes, block_size: int) -> bytes:
    try:
        return sodium.sodium_unpad(padded, block_size)
    except (nacl.exceptions.CryptoError, ValueError):
        raise AuthenticationError() from None


def x25519(secret: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret; an all-zero result (a low-order peer key) fails."""
    _check_key(peer_public, "peer public key")

    try:
        shared = sodium.crypto_scalarmult(secret, peer_public)
    except (nacl.exceptions.CryptoError, RuntimeError):
        raise AuthenticationError() from None
    if hmac.compare_digest(shared, bytes(KEY_SIZE)):
        raise AuthenticationError()
    return shared


def kdf(key: bytes, person: bytes, data: bytes = b"") -> bytes:
    """Derive 32 bytes as keyed BLAKE2b-256(key, personal=person, message=data)."""
    if len(person) != PERSON_SIZE:
        raise ValueError(f"KDF context must be {PERSON_SIZE} bytes, got {len(person)}")

    return nacl.hash.blake2b(data, digest_size=KEY_SIZE, key=key, person=person, encoder=nacl.encoding.RawEncoder)


def digest(data: bytes, person: bytes, size: int = KEY_SIZE) -> bytes:
    """Unkeyed BLAKE2b with a personalization string for domain separation."""
    if len(person) != PERSON_SIZE:
        raise ValueError(f"hash context must be {PERSON_SIZE} bytes, got {len(person)}")

    return nacl.hash.blake2b(data, digest_size=size, person=person, encoder=nacl.encoding.RawEncoder)


def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    _check_key(key, "chunk key")

    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, associated_data, AEAD_ZERO_NONCE, key)


def aead_decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    _check_key(key, "chunk key")
    if len(ciphertext) < AEAD_TAG_SIZE:
        raise AuthenticationError()

    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, associated_data, AEAD_ZERO_NONCE, key)
    except nacl.exceptions.CryptoError:
        raise AuthenticationError() from None


def encrypt_at_rest(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """XChaCha20-Poly1305 with a random 24-byte nonce, returned as nonce || ciphertext.

    For values stored on the device, where one key encrypts many records, so
    the nonce must be random rather than fixed. Random 192-bit nonces do not
    collide in practice (XChaCha20's reason to exist).
    """
    _check_key(key, "storage key")

    nonce = random_bytes(len(AEAD_ZERO_NONCE))
    return nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, associated_data, nonce, key)


def decrypt_at_rest(key: bytes, stored: bytes, associated_data: bytes) -> bytes:
    _check_key(key, "storage key")
    nonce_size = len(AEAD_ZERO_NONCE)
    if len(stored) < nonce_size + AEAD_TAG_SIZE:
        raise AuthenticationError()

    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(stored[nonce_size:], associated_data, stored[:nonce_size], key)
    except nacl.exceptions.CryptoError:
        raise AuthenticationError() from None


class SigningKey:
    """An Ed25519 signing key whose repr shows only the verify key's fingerprint."""

    __slots__ = ("verify_key", "_seed")

    def __init__(self, seed: bytes) -> None:
        _check_key(seed, "signing key seed")

        self._seed = seed
        self.verify_key, _ = sodium.crypto_sign_seed_keypair(seed)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(random_bytes(KEY_SIZE))

    @property
    def seed(self) -> bytes:
        return self._seed

    def sign(self, message: bytes) -> bytes:
        _, secret = sodium.crypto_sign_seed_keypair(self._seed)
        return sodium.crypto_sign(message, secret)[:SIGNATURE_SIZE]

    def __repr__(self) -> str:
        return f"SigningKey(verify_key={fingerprint(self.verify_key)})"


def verify_signature(verify_key: bytes, message: bytes, signature: bytes) -> None:
    if len(verify_key) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise AuthenticationError()

    try:
        sodium.crypto_sign_open(signature + message, verify_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        raise AuthenticationError() from None


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _check_key(key: bytes, name: str) -> None:
    if not isinstance(key, bytes):
        raise TypeError(f"{name} must be bytes")
    if len(key) != KEY_SIZE:
        raise ValueError(f"{name} must be {KEY_SIZE} bytes, got {len(key)}")
