"""The device side: attestation checks, sealing jobs and reading encrypted replies."""
