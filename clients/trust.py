"""The device's trust policy: pinned platform root keys and allowed measurements.

Stored as JSON so people can read and pin it:

    {"version": 1,
     "platform_keys": {"simulated": "<hex Ed25519 public key>"},
     "log_key": "<hex Ed25519 public key of the release transparency log>",
     "measurements": ["<hex BLAKE2b-256>"],
     "allow_simulated": true,
     "allow_dev": false}

With a log key, a pool is accepted when its measurement is proven to be in
the release log. `measurements` then matters only for development-mode
pools. Without one, the measurement must be in `measurements`.
"""

from __future__ import annotations

import json
from pathlib import Path

from confide.errors import AttestationError
from confide.schemas.attestation import TrustPolicy


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
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def load_trust(path: Path) -> TrustPolicy:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttestationError(
            f"no trust policy at {path}: start the local stack with 'confide up' or pass --trust FILE"
        ) from None
    except (OSError, ValueError) as exc:
        raise AttestationError(f"cannot read the trust policy {path}: {exc}") from None

    try:
        if document.get("version") != 1:
            raise ValueError("version must be 1")
        keys = {str(name): bytes.fromhex(value) for name, value in document["platform_keys"].items()}
        measurements = frozenset(bytes.fromhex(value) for value in document["measurements"])
        allow_simulated = bool(document.get("allow_simulated", False))
        max_age_s = int(document.get("max_age_s", 3600))
        log_key = bytes.fromhex(document["log_key"]) if document.get("log_key") else None
        allow_dev = bool(document.get("allow_dev", False))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AttestationError(f"the trust policy {path} is invalid: {exc}") from None
    return TrustPolicy(keys, measurements, allow_simulated, max_age_s, name=str(path), log_key=log_key, allow_dev=allow_dev)
