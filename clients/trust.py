"""The device's trust policy: pinned platform root keys and allowed measurements.

Stored as JSON so people can read and pin it:

    {"version": 1,
     "platform_keys": {"simulated": "<hex Ed25519 public key>"},
     "log_key": "<hex Ed25519 public key of the release transparency log>",
     "measurements": ["<hex BLAKE2b-256>"],
     "allow_simulated": true,
     "allow_dev": false,
     "sev_snp": {"ark": "<base64 DER certificate of AMD's root key>",
                 "launch_measurements": ["<hex, 48 bytes>"],
                 "minimum_tcb": {"boot_loader": 3, "tee": 0, "snp": 8, "microcode": 115},
                 "vmpl": 0, "allow_debug": false, "allow_migration_agent": false}}

With a log key, a pool is accepted when its measurement is proven to be in
the release log. `measurements` then matters only for development-mode
pools. Without one, the measurement must be in `measurements`.

"sev_snp" is needed only to accept SEV-SNP pools; `confide trust pin-sev-snp`
writes it. Its ARK, launch measurements and minimum TCB have no defaults,
because a missing expected value must fail verification, not pass it.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from cryptography import x509

from confide.errors import AttestationError
from confide.schemas.attestation import TrustPolicy
from confide.schemas.sev_snp import MEASUREMENT_SIZE, SnpTrustPolicy, TcbVersion

TCB_COMPONENTS = ("boot_loader", "tee", "snp", "microcode")
KEY_SIZE = 32  # Ed25519 public keys
MEASUREMENT_DIGEST_SIZE = 32  # confide's BLAKE2b-256 measurement


def save_trust(path: Path, policy: TrustPolicy) -> None:
    document = {
        "version": 1,
        "platform_keys": {name: key.hex() for name, key in sorted(policy.platform_keys.items())},
        "measurements": sorted(m.hex() for m in policy.measurements),
        "allow_simulated": policy.allow_simulated,
        "allow_dev": policy.allow_dev,
        "max_age_s": policy.max_age_s,
    }
    if policy.log_key is not None:
        document["log_key"] = policy.log_key.hex()
    if policy.sev_snp is not None:
        document["sev_snp"] = _snp_to_json(policy.sev_snp)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def load_trust(path: Path) -> TrustPolicy:
    """Read a trust policy, checking the type and size of every field; raise AttestationError naming the first bad one."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttestationError(
            f"no trust policy at {path}: start the local stack with 'confide up' or pass --trust FILE"
        ) from None
    except (OSError, ValueError) as exc:
        raise AttestationError(f"cannot read the trust policy {path}: {exc}") from None

    try:
        fields = _Fields(document, "", ("version", "platform_keys", "measurements", "allow_simulated", "allow_dev", "max_age_s", "log_key", "sev_snp"))
        version = fields.get("version", int, "1")
        if isinstance(version, bool) or version != 1:
            raise ValueError(f"version must be 1, got {json.dumps(version)}")
        platform_keys = fields.get("platform_keys", dict, "an object")
        keys = {str(name): _hex(value, f"platform_keys.{name}", KEY_SIZE) for name, value in platform_keys.items()}
        measurements = frozenset(fields.hex_list("measurements", MEASUREMENT_DIGEST_SIZE, allow_empty=True))
        # An empty or null log key means none is pinned, as save_trust writes no key at all.
        log_key = fields.hex_value("log_key", KEY_SIZE) if document.get("log_key") not in (None, "") else None
        policy = TrustPolicy(
            keys,
            measurements,
            allow_simulated=fields.boolean("allow_simulated", False),
            max_age_s=fields.integer("max_age_s", 3600, 1, 30 * 24 * 3600),
            name=str(path),
            log_key=log_key,
            allow_dev=fields.boolean("allow_dev", False),
            sev_snp=_snp_from_json(fields.get("sev_snp", dict, "an object")) if fields.has("sev_snp") else None,
        )
    except ValueError as exc:
        raise AttestationError(f"the trust policy {path} is invalid: {exc}") from None
    return policy


def _snp_to_json(policy: SnpTrustPolicy) -> dict[str, object]:
    return {
        "ark": base64.b64encode(policy.ark).decode("ascii"),
        "launch_measurements": sorted(m.hex() for m in policy.launch_measurements),
        "minimum_tcb": {name: getattr(policy.minimum_tcb, name) for name in TCB_COMPONENTS},
        "vmpl": policy.vmpl,
        "allow_debug": policy.allow_debug,
        "allow_migration_agent": policy.allow_migration_agent,
    }


def _snp_from_json(section: dict) -> SnpTrustPolicy:
    fields = _Fields(section, "sev_snp.", ("ark", "launch_measurements", "minimum_tcb", "vmpl", "allow_debug", "allow_migration_agent"))
    encoded = fields.get("ark", str, "a base64 string")
    try:
        ark = base64.b64decode(encoded, validate=True)
        x509.load_der_x509_certificate(ark)
    except (binascii.Error, ValueError):
        raise ValueError("sev_snp.ark is not a base64 DER X.509 certificate") from None
    launch_measurements = frozenset(fields.hex_list("launch_measurements", MEASUREMENT_SIZE, allow_empty=False))
    tcb = _Fields(fields.get("minimum_tcb", dict, "an object"), "sev_snp.minimum_tcb.", TCB_COMPONENTS)
    components = {name: tcb.integer(name, None, 0, 255) for name in TCB_COMPONENTS}
    return SnpTrustPolicy(
        ark=ark,
        launch_measurements=launch_measurements,
        minimum_tcb=TcbVersion(**components),
        vmpl=fields.integer("vmpl", 0, 0, 3),
        allow_debug=fields.boolean("allow_debug", False),
        allow_migration_agent=fields.boolean("allow_migration_agent", False),
    )


class _Fields:
    """Strict reads from one JSON object: unknown keys, missing keys and wrong types are errors that name the field."""

    def __init__(self, value: object, prefix: str, known: tuple[str, ...]) -> None:
        name = prefix.rstrip(".") or "the policy"
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown field {prefix}{unknown[0]}")
        self._value = value
        self._prefix = prefix

    def has(self, key: str) -> bool:
        return key in self._value

    def get(self, key: str, kind: type, description: str) -> object:
        if key not in self._value:
            raise ValueError(f"missing field {self._prefix}{key}")
        value = self._value[key]
        if not isinstance(value, kind):
            raise ValueError(f"{self._prefix}{key} must be {description}, got {json.dumps(value)[:40]}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        # bool() would read the string "false" as true, so only JSON true and false count.
        return self.get(key, bool, "true or false") if key in self._value else default

    def integer(self, key: str, default: int | None, low: int, high: int) -> int:
        if key not in self._value and default is not None:
            return default
        value = self.get(key, int, "a whole number")
        if isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{self._prefix}{key} must be a whole number from {low} to {high}, got {json.dumps(value)}")
        return value

    def hex_value(self, key: str, size: int) -> bytes:
        return _hex(self.get(key, str, "a hex string"), self._prefix + key, size)

    def hex_list(self, key: str, size: int, allow_empty: bool) -> list[bytes]:
        items = self.get(key, list, "a list of hex strings")
        if not items and not allow_empty:
            raise ValueError(f"{self._prefix}{key} is empty, so nothing could pass")
        return [_hex(item, f"{self._prefix}{key}[{position}]", size) for position, item in enumerate(items)]


def _hex(value: object, name: str, size: int) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{name} is not hex") from None
    if len(raw) != size:
        raise ValueError(f"{name} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw
