"""Device key sources: where the key that encrypts the outbox at rest comes from.

A key source turns a context string into 32 secret bytes, always the same
for the same device and context. Two sources exist:

- SoftwareKeyFile: a random 32-byte file (mode 0600) created on first use;
- Fido2KeySource: a FIDO2 authenticator's PRF (hmac-secret) output for a
  credential registered once with `confide keys init-fido2`, so the passkey
  that unlocks the device also unlocks the outbox.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from confide.errors import ConfideError
from confide.schemas import crypto

SOURCE_PERSON = b"confide:keysrc:1"
FIDO2_RP_ID = "confide.local"


class KeySourceError(ConfideError):
    """The device key could not be produced."""


class KeySource(Protocol):
    name: str

    def derive(self, context: bytes) -> bytes:
        """Return 32 secret bytes bound to this device and `context`."""
        ...


class SoftwareKeyFile:
    name = "key file"

    def __init__(self, path: Path) -> None:
        self.path = path

    def derive(self, context: bytes) -> bytes:
        return crypto.kdf(self._secret(), SOURCE_PERSON, context)

    def _secret(self) -> bytes:
        try:
            secret = self.path.read_bytes()
        except FileNotFoundError:
            return self._create()
        if len(secret) != crypto.KEY_SIZE:
            raise KeySourceError(f"the device key file {self.path} must hold {crypto.KEY_SIZE} bytes, found {len(secret)}")
        return secret

    def _create(self) -> bytes:
        secret = crypto.random_bytes(crypto.KEY_SIZE)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # Another process created it first; use that one.
            return self._secret()
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secret)
        return secret

    def __repr__(self) -> str:
        return f"SoftwareKeyFile({self.path})"


class Fido2KeySource:
    """Derive the device key from a FIDO2 authenticator's PRF extension.

    `client` is a fido2.client.Fido2Client (python-fido2 2.x). The credential
    file stores the credential id created by `register`; each `derive` requests
    from the authenticator for PRF(credential, salt=BLAKE2b(context)), which
    needs the user's touch or PIN as the authenticator requires.

    NOTE: exercised only against a stand-in client in the tests; no
    authenticator was available to run it against real hardware.
    """

    name = "FIDO2 authenticator"

    def __init__(self, client, credential_path: Path) -> None:
        self._client = client
        self.credential_path = credential_path

    def register(self, user_name: str = "confide device") -> None:
        from fido2.webauthn import (
            PublicKeyCredentialCreationOptions,
            PublicKeyCredentialParameters,
            PublicKeyCredentialRpEntity,
            PublicKeyCredentialType,
            PublicKeyCredentialUserEntity,
        )

        options = PublicKeyCredentialCreationOptions(
            rp=PublicKeyCredentialRpEntity(id=FIDO2_RP_ID, name="confide"),
            user=PublicKeyCredentialUserEntity(name=user_name, id=crypto.random_bytes(16)),
            challenge=crypto.random_bytes(32),
            pub_key_cred_params=[PublicKeyCredentialParameters(type=PublicKeyCredentialType.PUBLIC_KEY, alg=-7)],
            extensions={"prf": {}},
        )
        result = self._client.make_credential(options)
        prf = result.client_extension_results.prf
        if prf is None or not prf.enabled:
            raise KeySourceError("this authenticator does not support the PRF (hmac-secret) extension; use the key file instead")
        credential_id = result.response.attestation_object.auth_data.credential_data.credential_id
        self.credential_path.write_text(json.dumps({"rp_id": FIDO2_RP_ID, "credential_id": credential_id.hex()}), encoding="utf-8")

    def derive(self, context: bytes) -> bytes:
        from fido2.webauthn import (
            PublicKeyCredentialDescriptor,
            PublicKeyCredentialRequestOptions,
            PublicKeyCredentialType,
        )

        try:
            stored = json.loads(self.credential_path.read_text(encoding="utf-8"))
            credential_id = bytes.fromhex(stored["credential_id"])
        except (OSError, ValueError, KeyError) as exc:
            raise KeySourceError(f"no FIDO2 credential at {self.credential_path}: run 'confide keys init-fido2' ({type(exc).__name__})") from None

        salt = crypto.digest(context, SOURCE_PERSON)
        options = PublicKeyCredentialRequestOptions(
            challenge=crypto.random_bytes(32),
            rp_id=stored.get("rp_id", FIDO2_RP_ID),
            allow_credentials=[PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=credential_id)],
            extensions={"prf": {"eval": {"first": salt}}},
        )
        selection = self._client.get_assertion(options)
        prf = selection.get_response(0).client_extension_results.prf
        first = prf.results.first if prf is not None and prf.results is not None else None
        if not first or len(first) < crypto.KEY_SIZE:
            raise KeySourceError("the authenticator returned no PRF output for the confide credential")
        return crypto.kdf(bytes(first[: crypto.KEY_SIZE]), SOURCE_PERSON, context)

    def __repr__(self) -> str:
        return f"Fido2KeySource({self.credential_path})"
