"""The whole path on a real nats-server, a real worker process and the real model."""

from __future__ import annotations

import pytest

from confide.errors import AttestationError, EmptyPromptError
from confide.schemas.messages import ChatMessage, GenerationParams

pytestmark = pytest.mark.anyio

GREEDY = GenerationParams(max_tokens=48, temperature=0.0, seed=7)


@pytest.mark.parametrize("prompt_id", ["p15", "p21", "p31"], ids=["english", "hindi", "emoji"])
async def test_round_trip_streams_decrypted_reply(client, prompts, prompt_id):
    """A prompt from the shared set comes back as a streamed, complete, exact UTF-8 reply."""
    events = [event async for event in client.ask([ChatMessage("user", prompts[prompt_id]["prompt"])], GREEDY)]

    text = "".join(event.text for event in events)
    assert events[-1].final
    assert events[-1].finish in {"stop", "length"}
    assert events[-1].completion_tokens > 0
    assert text.strip()
    assert "\ufffd" not in text
    assert text.encode("utf-8").decode("utf-8") == text


@pytest.mark.parametrize("prompt_id", ["p21", "p28", "p31"])
async def test_reply_matches_direct_model_byte_for_byte(client, prompts, local_engine, prompt_id):
    """Through the encrypted path, a greedy reply equals llama.cpp's own output for the same prompt."""
    import threading

    messages = [ChatMessage("user", prompts[prompt_id]["prompt"])]
    params = GenerationParams(max_tokens=40, temperature=0.0)
    pieces: list[str] = []
    direct = local_engine.generate(local_engine.prompt_tokens(messages), params, pieces.append, threading.Event())

    events = [event async for event in client.ask(messages, params)]

    assert events[-1].prompt_tokens == direct.prompt_tokens
    assert events[-1].completion_tokens == direct.completion_tokens
    assert "".join(event.text for event in events).encode("utf-8") == "".join(pieces).encode("utf-8")


async def test_empty_prompt_rejected_before_sending(client, broker, prompts):
    """An empty prompt raises EmptyPromptError and publishes nothing."""
    js = client._nc.jetstream()
    before = (await js.stream_info("CONFIDE_JOBS")).state.last_seq

    with pytest.raises(EmptyPromptError):
        await client.submit([ChatMessage("user", prompts["p35"]["prompt"])])
    with pytest.raises(EmptyPromptError):
        await client.submit([ChatMessage("user", "  \n\t ")])

    assert (await js.stream_info("CONFIDE_JOBS")).state.last_seq == before


async def test_unknown_measurement_refused(broker, pool, worker):
    """A pool whose measurement is not in the allowed set gets no job."""
    from dataclasses import replace

    from confide.clients.client import Client

    from confide.schemas import crypto

    unlisted = replace(pool.policy, log_key=None, measurements=frozenset({bytes(32)}))
    other_log = replace(pool.policy, log_key=crypto.SigningKey.generate().verify_key)
    async with await Client.connect(broker.url, unlisted) as client:
        with pytest.raises(AttestationError, match="not in the allowed set"):
            await client.submit([ChatMessage("user", "hello")])
    async with await Client.connect(broker.url, other_log) as client:
        with pytest.raises(AttestationError, match="release log evidence is invalid"):
            await client.submit([ChatMessage("user", "hello")])


async def test_bad_signature_refused(broker, pool, worker):
    """A document signed by another platform key fails verification."""
    from dataclasses import replace

    from confide.clients.client import Client
    from confide.schemas import crypto

    policy = replace(pool.policy, platform_keys={"simulated": crypto.SigningKey.generate().verify_key})
    async with await Client.connect(broker.url, policy) as client:
        with pytest.raises(AttestationError, match="signature is invalid"):
            await client.submit([ChatMessage("user", "hello")])
