"""confide: private AI inference over NATS JetStream with attested workers."""

__version__ = "0.1.0"
