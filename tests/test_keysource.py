"""Device key sources: the key file, and the FIDO2 PRF path against a stand-in authenticator client."""

from __future__ import annotations

import hashlib
import hmac
import stat
from types import SimpleNamespace

import pytest

from confide.clients.keysource import Fido2KeySource, KeySourceError, SoftwareKeyFile


def test_key_file_created_private_and_stable(tmp_path):
    """The key file is created once with mode 0600 and derives the same key every time."""
    source = SoftwareKeyFile(tmp_path / "device.key")
    first = source.derive(b"outbox")

    assert stat.S_IMODE((tmp_path / "device.key").stat().st_mode) == 0o600
    assert SoftwareKeyFile(tmp_path / "device.key").derive(b"outbox") == first
    assert source.derive(b"other context") != first


def test_key_file_wrong_size_rejected(tmp_path):
    (tmp_path / "device.key").write_bytes(b"short")

    with pytest.raises(KeySourceError, match="must hold 32 bytes"):
        SoftwareKeyFile(tmp_path / "device.key").derive(b"outbox")


class StandInClient:
    """Responds like python-fido2's Fido2Client with an authenticator that supports PRF.

    The PRF output is HMAC-SHA256 of the salt under a per-credential secret, as
    the hmac-secret extension computes it inside a real authenticator.
    """

    def __init__(self, prf_supported: bool = True) -> None:
        self.secret = b"authenticator credential secret"
        self.credential_id = b"credential-id-1"
        self.prf_supported = prf_supported

    def make_credential(self, options):
        prf = SimpleNamespace(enabled=self.prf_supported, results=None)
        credential_data = SimpleNamespace(credential_id=self.credential_id)
        response = SimpleNamespace(attestation_object=SimpleNamespace(auth_data=SimpleNamespace(credential_data=credential_data)))
        return SimpleNamespace(client_extension_results=SimpleNamespace(prf=prf), response=response)

    def get_assertion(self, options):
        assert options.allow_credentials[0].id == self.credential_id
        salt = options.extensions["prf"]["eval"]["first"]
        first = hmac.new(self.secret, hashlib.sha256(b"WebAuthn PRF\x00" + salt).digest(), hashlib.sha256).digest()
        prf = SimpleNamespace(enabled=None, results=SimpleNamespace(first=first, second=None))
        response = SimpleNamespace(client_extension_results=SimpleNamespace(prf=prf))
        return SimpleNamespace(get_response=lambda index: response)


def test_fido2_prf_key_stable_per_context(tmp_path):
    """A registered credential's PRF output yields the same key for a context, another for another."""
    source = Fido2KeySource(StandInClient(), tmp_path / "credential.json")
    source.register()

    key = source.derive(b"outbox")
    assert len(key) == 32
    assert source.derive(b"outbox") == key
    assert source.derive(b"other") != key


def test_fido2_without_prf_rejected(tmp_path):
    source = Fido2KeySource(StandInClient(prf_supported=False), tmp_path / "credential.json")

    with pytest.raises(KeySourceError, match="does not support the PRF"):
        source.register()


def test_fido2_unregistered_rejected(tmp_path):
    with pytest.raises(KeySourceError, match="init-fido2"):
        Fido2KeySource(StandInClient(), tmp_path / "missing.json").derive(b"outbox")
