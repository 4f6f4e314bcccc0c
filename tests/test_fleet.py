"""A fleet: three ``ssegate serve`` processes sharing one Redis. Limits hold exactly across the replicas."""
from __future__ import annotations

import asyncio
import hashlib
import sys
from collections import Counter

import openai
import pytest
import redis.asyncio as aioredis

from plugins._ratelimit_core import UNIT
from proxy.tokens import estimate_prompt_tokens
from tests.conftest import spawn, stop
from tests.redis_server import RedisServer

BURST_KEY = "sk-fleet-burst-5e1f0c2a9d"
TOKENS_KEY = "sk-fleet-tokens-7b3a9e04c1"
MESSAGES = [{"role": "user", "content": "Say hello"}]
REPLICAS = 3


class Fleet:
    def __init__(self, urls: list[str], redis_url: str) -> None:
        self.urls, self.redis_url = urls, redis_url

    def client(self, i: int, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.urls[i % len(self.urls)], api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, simulator_process):
    redis = RedisServer().start()
    directory = tmp_path_factory.mktemp("fleet")
    key_file = directory / "keys.txt"
    key_file.write_text(
        f"{BURST_KEY} name=burst rpm=1 rpm_burst=100 tpm=1000000   # 100 at once, then one a minute\n"
        f"{TOKENS_KEY} name=tokens rpm=10000 tpm=1 tpm_burst=100000  # tokens: a burst, no refill to speak of\n")
    config = directory / "ssegate.yaml"
    config.write_text(f"""\
logging: {{level: warning}}
redis: {{url: "{redis.url}"}}
providers:
  - {{name: sim, type: openai, base_url: "{simulator_process}"}}
pipeline:
  - auth: {{key_file: "{key_file}", keys_env: null}}
  - ratelimit: {{backend: redis}}
  - router
""")
    procs = []
    try:
        for _ in range(REPLICAS):
            procs.append(spawn([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0"],
                               "ssegate listening on"))
        yield Fleet([line.rsplit(" ", 1)[-1] + "/v1" for _, line in procs], redis.url)
    finally:
        for proc, _ in procs:  # all at once, then wait for each
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs:
            stop(proc)
        redis.stop()


def bucket(key: str, kind: str) -> str:
    return f"ssegate:rl:{{{hashlib.sha256(key.encode()).digest()[:8].hex()}}}:{kind}"


async def test_three_replicas_admit_exactly_the_burst(fleet):
    """200 concurrent clients spread over 3 replicas against a burst of 100 (refilling one a minute): exactly
    100 are admitted and 100 refused, whichever replica they reach."""
    clients = [fleet.client(i, BURST_KEY) for i in range(REPLICAS)]

    async def call(i: int) -> tuple[int, int, object]:
        try:
            await clients[i % REPLICAS].chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
            return i % REPLICAS, 200, None
        except openai.APIStatusError as exc:
            return i % REPLICAS, exc.status_code, exc

    try:
        results = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(200))), 120)
    finally:
        for c in clients:
            await c.close()
    statuses = Counter(status for _, status, _ in results)
    assert statuses == {200: 100, 429: 100}
    admitted_by = Counter(replica for replica, status, _ in results if status == 200)
    assert len(admitted_by) >= 2  # the admissions really were shared by the replicas
    for _, status, exc in results:
        if status == 429:
            assert exc.code == "rate_limit_exceeded" and exc.body["type"] == "requests"
            assert 1 <= int(exc.response.headers["retry-after"]) <= 60
    r = aioredis.Redis.from_url(fleet.redis_url)
    try:
        level = int(await r.hget(bucket(BURST_KEY, "r"), "l"))
    finally:
        await r.aclose()
    assert 0 <= level < UNIT  # the bucket is empty: every one of the 100 requests was counted once


async def _token_level(r: aioredis.Redis) -> int:
    value = await r.hget(bucket(TOKENS_KEY, "t"), "l")
    return 100_000 * UNIT if value is None else int(value)


async def _settle(r: aioredis.Redis, accept) -> int:
    """Poll the shared bucket until ``accept(level)`` (the reconcile of another process has landed)."""
    for _ in range(500):
        level = await _token_level(r)
        if accept(level):
            return level
        await asyncio.sleep(0.01)
    raise AssertionError(f"the token bucket never settled (level {level / UNIT:.2f} tokens)")


async def test_token_reservations_reconcile_across_replicas(fleet):
    """Tokens reserved by one replica and reconciled with the streamed usage are seen by the others; a client
    that leaves mid-stream is charged what it received, not its whole reservation."""
    r = aioredis.Redis.from_url(fleet.redis_url)
    clients = [fleet.client(i, TOKENS_KEY) for i in range(REPLICAS)]
    prompt = estimate_prompt_tokens("chat.completions", {"messages": MESSAGES})
    try:
        # replica 0: a stream with usage
        stream = await clients[0].chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                          max_tokens=50, stream_options={"include_usage": True})
        usage = [c.usage async for c in stream if c.usage][0]
        used = usage.total_tokens
        assert usage.completion_tokens == 50
        await _settle(r, lambda level: level // UNIT == 100_000 - used)

        # replica 1 sees the reconciled bucket
        raw = await clients[1].chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                         max_tokens=10)
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(100_000 - used - (prompt + 10))
        answer = raw.parse()
        used += answer.usage.total_tokens
        before = await _settle(r, lambda level: level // UNIT == 100_000 - used)

        # replica 2: the client leaves after three events of a 2000-token stream
        stream = await clients[2].chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                          max_tokens=2000)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
        reserved = prompt + 2000
        after = await _settle(r, lambda level: level > before - reserved * UNIT + UNIT)
        charged = -(-(before - after) // UNIT)  # the bucket refilled by well under a token meanwhile
        assert prompt + 3 <= charged < reserved
    finally:
        for c in clients:
            await c.close()
        await r.aclose()
