"""Unit tests of the reply key schedule's receiver rules, with real PyNaCl."""

from __future__ import annotations

import pytest

from confide.errors import AuthenticationError, ReplyOrderError
from confide.schemas import crypto
from confide.schemas.messages import ChunkBody, ReplyChunk
from confide.schemas.reply_keys import ReplyReceiver, ReplySender

JOB_ID = bytes(range(16))
TOKEN = bytes(range(32))


def make_reply(client_keys: crypto.KeyPair, attempt: int, texts: list[str]) -> list[ReplyChunk]:
    sender = ReplySender(JOB_ID, TOKEN, client_keys.public, attempt)
    chunks = [sender.seal(ChunkBody(text), final=False) for text in texts]
    chunks.append(sender.seal(ChunkBody("", finish="stop", completion_tokens=len(texts)), final=True))
    return chunks


def read(receiver: ReplyReceiver, chunks: list[ReplyChunk]) -> str:
    parts = []
    for chunk in chunks:
        opened = receiver.open(ReplyChunk.from_wire(chunk.to_wire()))
        if opened is None:
            continue
        if opened.restarted:
            parts.clear()
        parts.append(opened.body.text)
    return "".join(parts)


def test_receiver_reads_chunks_in_order():
    """Chunks of one attempt open to the sent text, exactly."""
    keys = crypto.KeyPair.generate()
    receiver = ReplyReceiver(JOB_ID, TOKEN, crypto.KeyPair(keys.secret))

    assert read(receiver, make_reply(keys, 1, ["नमस्ते ", "😀", " ok"])) == "नमस्ते 😀 ok"
    assert receiver.complete


def test_receiver_ignores_foreign_key_same_attempt():
    """A second worker's reply under the same attempt number is ignored, not fatal."""
    keys = crypto.KeyPair.generate()
    genuine = make_reply(keys, 1, ["one ", "two"])
    replayed = make_reply(keys, 1, ["other"])
    receiver = ReplyReceiver(JOB_ID, TOKEN, crypto.KeyPair(keys.secret))

    text = read(receiver, [genuine[0], replayed[0], replayed[1], genuine[1], genuine[2]])

    assert text == "one two"
    assert receiver.foreign == 1  # replayed[1] arrived at the index this receiver expected
    assert receiver.ignored == 1  # replayed[0] has an index already read


def test_receiver_restart_discards_partial_attempt():
    """A newer attempt starts the reply over; chunks of the older attempt are then ignored."""
    keys = crypto.KeyPair.generate()
    first = make_reply(keys, 1, ["partial "])
    second = make_reply(keys, 2, ["complete"])
    receiver = ReplyReceiver(JOB_ID, TOKEN, crypto.KeyPair(keys.secret))

    assert read(receiver, [first[0], second[0], first[1], second[1]]) == "complete"
    assert receiver.attempt == 2


def test_receiver_rejects_skipped_chunk():
    """A chunk past the next expected index means the stream was reordered."""
    keys = crypto.KeyPair.generate()
    chunks = make_reply(keys, 1, ["a", "b"])
    receiver = ReplyReceiver(JOB_ID, TOKEN, crypto.KeyPair(keys.secret))
    receiver.open(chunks[0])

    with pytest.raises(ReplyOrderError):
        receiver.open(chunks[2])


def test_receiver_state_unchanged_after_forgery():
    """A forged chunk fails, and the genuine chunk at that index still opens afterwards."""
    keys = crypto.KeyPair.generate()
    chunks = make_reply(keys, 1, ["a", "b"])
    forged = ReplyChunk(1, 1, False, chunks[1].worker_key, bytes(len(chunks[1].ciphertext)))
    receiver = ReplyReceiver(JOB_ID, TOKEN, crypto.KeyPair(keys.secret))
    receiver.open(chunks[0])

    with pytest.raises(AuthenticationError):
        receiver.open(forged)
    assert receiver.open(chunks[1]).body.text == "b"


def test_sender_erases_chain_after_final():
    """Nothing can be sealed after the final chunk: the chain key is gone."""
    keys = crypto.KeyPair.generate()
    sender = ReplySender(JOB_ID, TOKEN, keys.public, 1)
    sender.seal(ChunkBody("", finish="stop"), final=True)

    with pytest.raises(RuntimeError):
        sender.seal(ChunkBody("late"), final=False)
