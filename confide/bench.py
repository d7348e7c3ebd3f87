"""`make bench`: the encrypted path against llama-cpp-python, and how fast JetStream accepts sealed jobs.

generate: both paths run the same GGUF, chat template, context size, thread
count and greedy sampling on the shared prompts, one prompt at a time and
alternating, in one run. Greedy decoding makes both produce the same tokens,
so each prompt's completion token count (reported by the worker) serves both
sides.

- time to first token (TTFT): from the call (direct) or from sealing the job
  (encrypted) to the first text the caller can show;
- generation rate: completion tokens / (last text - first text).

accept: one client process seals jobs and publishes them with many PubAcks
outstanding; the rate is jobs acknowledged per second of wall time, and the
process's resident memory is sampled after each tenth of the jobs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from confide import stack
from confide.clients.client import Client
from confide.clients.trust import save_trust
from confide.release import append_release, load_or_create_log_key, publish_release_log
from confide.schemas.messages import ChatMessage, GenerationParams
from confide.workers.engine import DEFAULT_N_CTX, EngineSettings, default_model_path, silence_native_logs
from confide.workers.measurement import measure
from confide.workers.tee import create_platform_key

PROMPTS = Path(__file__).resolve().parent.parent / "tests" / "prompts.jsonl"


@dataclass
class Sample:
    prompt_id: str
    ttft_s: float
    generation_s: float
    tokens: int
    text: str


def load_prompts(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["id"], row["prompt"]) for row in rows if row["prompt"].strip()]


def run_direct(llm, prompt: str, max_tokens: int) -> tuple[float, float, str]:
    started = time.perf_counter()
    first = last = None
    parts = []
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], stream=True, temperature=0.0, max_tokens=max_tokens
    ):
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            now = time.perf_counter()
            first = first or now
            last = now
            parts.append(content)
    first = first or time.perf_counter()
    last = last or first
    return first - started, last - first, "".join(parts)


async def run_encrypted(client: Client, prompt: str, max_tokens: int) -> tuple[float, float, int, str]:
    started = time.perf_counter()
    first = last = None
    parts = []
    tokens = 0
    async for event in client.ask([ChatMessage("user", prompt)], GenerationParams(max_tokens=max_tokens, temperature=0.0)):
        if event.text:
            now = time.perf_counter()
            first = first or now
            last = now
            parts.append(event.text)
        if event.final:
            tokens = event.completion_tokens
    first = first or time.perf_counter()
    last = last or first
    return first - started, last - first, tokens, "".join(parts)


def summarise(name: str, samples: list[Sample]) -> dict[str, float]:
    tokens = sum(s.tokens for s in samples)
    seconds = sum(s.generation_s for s in samples)
    return {
        "name": name,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "ttft_median_ms": statistics.median(s.ttft_s for s in samples) * 1000,
        "ttft_mean_ms": statistics.fmean(s.ttft_s for s in samples) * 1000,
    }


class WorkerStartFailed(Exception):
    """A benchmark worker exited or was not ready in time; its log was printed."""


@dataclass
class LocalPool:
    url: str
    policy: object
    workers: list


@contextlib.asynccontextmanager
async def local_pool(n_ctx: int, workers: int, threads: int | None) -> AsyncIterator[LocalPool]:
    """Start a loopback broker and `workers` workers in a temporary state folder; stop them on exit.

    The broker is open: credentials cost nothing per token, so the
    comparisons are the same as with `confide up`'s secured one. Raises
    WorkerStartFailed, after printing the worker's log, when a worker fails to start.
    """
    model = default_model_path()
    settings = EngineSettings(model, n_ctx, threads)
    with tempfile.TemporaryDirectory(prefix="confide-bench-") as temporary:
        state = stack.StackState(Path(temporary))
        platform_key = create_platform_key(state.platform_key)
        measurement = measure(model, settings.measured())
        log_key = load_or_create_log_key(state.log_key)
        append_release(state.release_log, measurement)
        policy = stack.local_trust_policy(platform_key.verify_key, measurement, log_key.verify_key)
        save_trust(state.trust, policy)
        port = stack.free_port()
        broker, url = stack.start_broker(state, stack.HOST, port)
        pool = LocalPool(url, policy, [])
        try:
            stack.wait_for_port(stack.HOST, port, 15, broker)
            await publish_release_log(url, state.release_log, log_key)
            for index in range(workers):
                pool.workers.append(stack.start_worker(state, index, url, None, n_ctx, threads=threads))
                deadline = time.monotonic() + 120
                while not state.worker_stats(index).exists():
                    if pool.workers[-1].poll() is not None or time.monotonic() > deadline:
                        print(state.worker_log(index).read_text(errors="replace"), file=sys.stderr)
                        raise WorkerStartFailed
                    await anyio.sleep(0.1)
            yield pool
        finally:
            for worker in pool.workers:
                stack.stop_process(worker.pid)
            stack.stop_process(broker.pid)


async def bench(args: argparse.Namespace) -> int:
    import llama_cpp

    model = default_model_path()
    prompts = load_prompts(PROMPTS)[: args.limit or None]

    try:
        async with local_pool(args.n_ctx, 1, args.threads) as pool:
            silence_native_logs()
            llm = llama_cpp.Llama(model_path=str(model), n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            direct: list[Sample] = []
            encrypted: list[Sample] = []
            mismatched = 0
            async with await Client.connect(pool.url, pool.policy) as client:
                await client.ask_text([ChatMessage("user", "warm up")], GenerationParams(max_tokens=8, temperature=0.0))
                run_direct(llm, "warm up", 8)
                for round_index in range(args.rounds):
                    for prompt_id, prompt in prompts:
                        e_ttft, e_gen, tokens, e_text = await run_encrypted(client, prompt, args.max_tokens)
                        d_ttft, d_gen, d_text = run_direct(llm, prompt, args.max_tokens)
                        if d_text != e_text:
                            mismatched += 1
                        encrypted.append(Sample(prompt_id, e_ttft, e_gen, tokens, e_text))
                        direct.append(Sample(prompt_id, d_ttft, d_gen, tokens, d_text))
                        print(
                            f"round {round_index + 1} {prompt_id}: {tokens} tokens, "
                            f"direct {d_ttft * 1000:.0f} ms TTFT, encrypted {e_ttft * 1000:.0f} ms TTFT",
                            file=sys.stderr,
                        )
    except WorkerStartFailed:
        return 1

    d = summarise("direct llama-cpp-python", direct)
    e = summarise("confide encrypted path", encrypted)
    print(f"date:     {time.strftime('%Y-%m-%d')}")
    print(f"machine:  {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"model:    {model.name}, n_ctx {args.n_ctx}, {args.threads} threads, greedy, max_tokens {args.max_tokens}")
    print(f"prompts:  {len(prompts)} x {args.rounds} rounds; texts that differed between paths: {mismatched}")
    print()
    print("| path | tokens | tokens/s | TTFT median (ms) | TTFT mean (ms) |")
    print("|---|---:|---:|---:|---:|")
    for row in (d, e):
        print(f"| {row['name']} | {row['tokens']} | {row['tokens_per_s']:.1f} | {row['ttft_median_ms']:.1f} | {row['ttft_mean_ms']:.1f} |")
    print()
    print(f"throughput ratio (encrypted / direct): {e['tokens_per_s'] / d['tokens_per_s']:.3f}  (goal >= 0.97)")
    print(f"TTFT ratio, median (encrypted / direct): {e['ttft_median_ms'] / d['ttft_median_ms']:.3f}  (goal <= 1.05)")
    return 0


async def accept_bench(args: argparse.Namespace) -> int:
    """Seal and publish many jobs from this one process, and report how fast JetStream accepts them.

    A worker starts only to create the pool and publish its attestation
    document, then stops, so nothing consumes the jobs and the client has
    the machine's cores to itself, as a client device would.
    """
    prompt = load_prompts(PROMPTS)[0][1]
    messages = [ChatMessage("user", prompt)]
    params = GenerationParams(max_tokens=64)

    try:
        async with local_pool(args.n_ctx, 1, 1) as pool:
            for worker in pool.workers:
                stack.stop_process(worker.pid)
            async with await Client.connect(pool.url, pool.policy) as client:
                await client.attest()
                envelope_size = len((await client.prepare(messages, params)).envelope)
                result = await _publish_many(client, messages, params, args.jobs, args.window)
    except WorkerStartFailed:
        return 1

    elapsed, sealing_s, rss = result
    print(f"date:     {time.strftime('%Y-%m-%d')}")
    print(f"machine:  {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"jobs:     {args.jobs} of {envelope_size} bytes each (prompt {PROMPTS.name} first row), {args.window} publishes in flight")
    print()
    print(f"accepted: {args.jobs / elapsed:,.0f} jobs/s  (goal >= 10,000)  in {elapsed:.1f} s")
    print(f"sealing alone: {args.jobs / sealing_s:,.0f} jobs/s of this process's time")
    print("resident memory (MiB) after each tenth of the jobs: " + ", ".join(f"{value / 2**20:.0f}" for value in rss))
    print(f"growth from the first tenth to the end: {(rss[-1] - rss[0]) / 2**20:+.1f} MiB")
    return 0


async def _publish_many(client: Client, messages, params, jobs: int, window: int) -> tuple[float, float, list[int]]:
    """Publish `jobs` freshly sealed jobs, at most `window` awaiting their PubAck at once.

    Return the wall time, the time spent sealing, and the resident memory
    after each tenth of the jobs.
    """
    pending: collections.deque = collections.deque()
    sealing_s = 0.0
    rss: list[int] = []
    step = max(1, jobs // 10)

    started = time.perf_counter()
    for index in range(1, jobs + 1):
        sealed_at = time.perf_counter()
        prepared = await client.prepare(messages, params)
        sealing_s += time.perf_counter() - sealed_at
        pending.append(await client.start_publish(prepared))
        if len(pending) >= window:
            await pending.popleft()
        if index % step == 0:
            rss.append(_resident_bytes())
    while pending:
        await pending.popleft()
    return time.perf_counter() - started, sealing_s, rss


async def concurrent_bench(args: argparse.Namespace) -> int:
    """Run `--concurrency` jobs at a time through a pool of `--workers` workers; report aggregate tokens per second.

    The reference is llama-cpp-python called directly on the same prompts,
    one after another, with all the machine's threads: llama.cpp's own
    server, which the goal names, is not installed here.
    """
    import llama_cpp

    model = default_model_path()
    prompts = [prompt for _, prompt in load_prompts(PROMPTS)[: args.limit or None]]
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)

    try:
        async with local_pool(args.n_ctx, args.workers, args.worker_threads) as pool:
            async with await Client.connect(pool.url, pool.policy, reply_timeout_s=600) as client:
                await client.ask_text([ChatMessage("user", "warm up")], GenerationParams(max_tokens=8, temperature=0.0))
                tokens = 0
                limiter = anyio.Semaphore(args.concurrency)

                async def one(prompt: str) -> None:
                    nonlocal tokens
                    async with limiter:
                        async for event in client.ask([ChatMessage("user", prompt)], params):
                            if event.final:
                                tokens += event.completion_tokens

                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for prompt in prompts:
                        tg.start_soon(one, prompt)
                confide_s = time.perf_counter() - started
    except WorkerStartFailed:
        return 1

    silence_native_logs()
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=args.n_ctx, n_threads=os.cpu_count(), verbose=False)
    run_direct(llm, "warm up", 8)
    direct_tokens = 0
    started = time.perf_counter()
    for prompt in prompts:
        result = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=args.max_tokens)
        direct_tokens += result["usage"]["completion_tokens"]
    direct_s = time.perf_counter() - started

    print(f"date:     {time.strftime('%Y-%m-%d')}")
    print(f"machine:  {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"jobs:     {len(prompts)} prompts, {args.concurrency} at a time, max_tokens {args.max_tokens}, greedy")
    print(f"pool:     {args.workers} worker(s) with {args.worker_threads} llama.cpp thread(s) each")
    print()
    print(f"confide, aggregate: {tokens / confide_s:.1f} completion tokens/s ({tokens} tokens in {confide_s:.1f} s)")
    print(f"direct, one prompt at a time with {os.cpu_count()} threads: {direct_tokens / direct_s:.1f} completion tokens/s ({direct_tokens} tokens in {direct_s:.1f} s)")
    return 0


def _resident_bytes() -> int:
    """Return this process's resident set size, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("generate", "accept", "concurrent", "all"), default="all", help="what to measure [default: all]")
    parser.add_argument("--rounds", type=int, default=1, help="generate: passes over the prompt set")
    parser.add_argument("--max-tokens", type=int, default=128, help="generate, concurrent: tokens generated per prompt")
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX, help="model context size")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="generate: llama.cpp threads on both paths")
    parser.add_argument("--limit", type=int, default=0, help="generate, concurrent: use only the first N prompts (0: all)")
    parser.add_argument("--jobs", type=int, default=100_000, help="accept: jobs to seal and publish")
    parser.add_argument("--window", type=int, default=1024, help="accept: publishes awaiting their PubAck at once")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent: jobs in flight at once")
    parser.add_argument("--workers", type=int, default=2, help="concurrent: workers in the pool")
    parser.add_argument("--worker-threads", type=int, default=1, help="concurrent: llama.cpp threads in each worker")
    args = parser.parse_args()
    status = 0
    if args.mode in ("generate", "all"):
        status = anyio.run(bench, args)
    if status == 0 and args.mode in ("accept", "all"):
        print()
        status = anyio.run(accept_bench, args)
    if status == 0 and args.mode in ("concurrent", "all"):
        print()
        status = anyio.run(concurrent_bench, args)
    sys.exit(status)


if __name__ == "__main__":
    main()
