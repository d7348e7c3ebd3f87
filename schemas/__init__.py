"""The wire protocol both sides share: messages, codec, key schedule and subjects."""
