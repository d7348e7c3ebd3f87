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
        sev_snp = _snp_from_json(document["sev_snp"]) if "sev_snp" in document else None
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise AttestationError(f"the trust policy {path} is invalid: {_describe(exc)}") from None
    return TrustPolicy(
        keys, measurements, allow_simulated, max_age_s, name=str(path), log_key=log_key, allow_dev=allow_dev, sev_snp=sev_snp
    )


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
    ark = base64.b64decode(section["ark"], validate=True)
    try:
        x509.load_der_x509_certificate(ark)
    except ValueError:
        raise ValueError("sev_snp.ark is not a base64 DER X.509 certificate") from None
    launch_measurements = frozenset(bytes.fromhex(value) for value in section["launch_measurements"])
    if not launch_measurements:
        raise ValueError("sev_snp.launch_measurements is empty, so no SEV-SNP pool could pass")
    for measurement in launch_measurements:
        if len(measurement) != MEASUREMENT_SIZE:
            raise ValueError(f"sev_snp.launch_measurements holds a {len(measurement)}-byte value, expected {MEASUREMENT_SIZE}")
    tcb = section["minimum_tcb"]
    components = {name: int(tcb[name]) for name in TCB_COMPONENTS}
    for name, value in components.items():
        if not 0 <= value <= 255:
            raise ValueError(f"sev_snp.minimum_tcb.{name} is {value}, outside 0 to 255")
    vmpl = int(section.get("vmpl", 0))
    if not 0 <= vmpl <= 3:
        raise ValueError(f"sev_snp.vmpl is {vmpl}, outside 0 to 3")
    return SnpTrustPolicy(
        ark=ark,
        launch_measurements=launch_measurements,
        minimum_tcb=TcbVersion(**components),
        vmpl=vmpl,
        allow_debug=bool(section.get("allow_debug", False)),
        allow_migration_agent=bool(section.get("allow_migration_agent", False)),
    )


def _describe(exc: Exception) -> str:
    # A KeyError's text is only the key's repr, so name the problem.
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
