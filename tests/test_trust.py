"""Tests of the trust policy file (clients/trust.py): a round trip, and strict reading of hand-edited files."""

from __future__ import annotations

import json

import pytest
from sev_snp_fakes import LAUNCH_MEASUREMENT, TCB, make_amd_root

from confide.clients.trust import load_trust, save_trust
from confide.errors import AttestationError
from confide.schemas.attestation import TrustPolicy
from confide.schemas.sev_snp import SnpTrustPolicy

SNP = SnpTrustPolicy(ark=make_amd_root().ark, launch_measurements=frozenset({LAUNCH_MEASUREMENT}), minimum_tcb=TCB)
POLICY = TrustPolicy(
    platform_keys={"simulated": bytes(range(32))},
    measurements=frozenset({bytes(range(32, 64))}),
    allow_simulated=True,
    log_key=bytes(range(64, 96)),
    sev_snp=SNP,
)


@pytest.fixture
def saved(tmp_path) -> dict:
    save_trust(tmp_path / "trust.json", POLICY)
    return json.loads((tmp_path / "trust.json").read_text())


def test_trust_round_trip(tmp_path):
    """A saved policy loads back with every field, the SEV-SNP section included."""
    save_trust(tmp_path / "trust.json", POLICY)

    assert load_trust(tmp_path / "trust.json") == POLICY


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("allow_dev",), "false", 'allow_dev must be true or false, got "false"'),
        (("allow_simulated",), 0, "allow_simulated must be true or false"),
        (("version",), True, "version must be 1"),
        (("max_age_s",), 8.9, "max_age_s must be a whole number"),
        (("log_key",), "abcd", "log_key must be 32 bytes"),
        (("measurements",), ["zz"], r"measurements\[0\] is not hex"),
        (("platform_keys",), [], "platform_keys must be an object"),
        (("allow_dve",), True, "unknown field allow_dve"),
        (("sev_snp",), None, "sev_snp must be an object"),
        (("sev_snp", "ark"), "not base64!", "sev_snp.ark is not a base64 DER X.509 certificate"),
        (("sev_snp", "allow_debug"), "false", "sev_snp.allow_debug must be true or false"),
        (("sev_snp", "vmpl"), "0", "sev_snp.vmpl must be a whole number"),
        (("sev_snp", "vmpl"), 4, "sev_snp.vmpl must be a whole number from 0 to 3"),
        (("sev_snp", "launch_measurements"), [], "sev_snp.launch_measurements is empty"),
        (("sev_snp", "launch_measurements"), ["00" * 47], r"sev_snp.launch_measurements\[0\] must be 48 bytes"),
        (("sev_snp", "minimum_tcb", "snp"), "8", "sev_snp.minimum_tcb.snp must be a whole number"),
        (("sev_snp", "minimum_tcb", "snp"), True, "sev_snp.minimum_tcb.snp must be a whole number from 0 to 255"),
        (("sev_snp", "minimum_tcb", "snp"), 256, "sev_snp.minimum_tcb.snp must be a whole number from 0 to 255"),
        (("sev_snp", "alow_debug"), True, "unknown field sev_snp.alow_debug"),
    ],
)
def test_trust_rejects_wrong_field(saved, tmp_path, path, value, message):
    """A hand-edited field of the wrong type, size or name fails with a message that names it; none is coerced."""
    target = saved
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (tmp_path / "edited.json").write_text(json.dumps(saved))

    with pytest.raises(AttestationError, match=message):
        load_trust(tmp_path / "edited.json")


@pytest.mark.parametrize("path", [("sev_snp", "ark"), ("sev_snp", "minimum_tcb"), ("sev_snp", "minimum_tcb", "tee"), ("platform_keys",)])
def test_trust_rejects_missing_field(saved, tmp_path, path):
    """A missing required field fails and is named: there is no default for an expected value."""
    target = saved
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    (tmp_path / "edited.json").write_text(json.dumps(saved))

    with pytest.raises(AttestationError, match="missing field " + ".".join(path)):
        load_trust(tmp_path / "edited.json")
