"""NATS names of protocol version 1: subjects, streams, consumers and buckets.

No name carries anything client-specific except a reply subject's random
token, a one-way hash of the job's secret reply token.
"""

from confide.schemas.messages import reply_subject_token

JOBS_STREAM = "CONFIDE_JOBS"
JOBS_SUBJECT = "confide.jobs.v1"
WORKERS_CONSUMER = "confide-workers"

REPLIES_STREAM = "CONFIDE_REPLIES"
REPLY_SUBJECT_PREFIX = "confide.reply.v1"
# Reply subjects end in this fixed token, never in the random one: a consumer
# filter with ">" in the random token's place is then invalid, because ">"
# may only be a subject's last token. broker_config/permissions.py relies on it.
REPLY_SUBJECT_SUFFIX = "chunks"

POOL_BUCKET = "confide_pool"
ATTESTATION_KEY = "attestation"

KEY_RELEASE_SUBJECT = "confide.pool.v1.key_release"


def reply_subject(reply_token: bytes) -> str:
    return f"{REPLY_SUBJECT_PREFIX}.{reply_subject_token(reply_token)}.{REPLY_SUBJECT_SUFFIX}"
