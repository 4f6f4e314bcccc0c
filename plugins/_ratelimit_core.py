"""The rate-limit algorithm and its two backends (in-process memory, shared Redis), with identical arithmetic.

Every limit is a token bucket refilled continuously: a requests bucket (capacity ``rpm_burst``, default ``rpm``,
refilled at ``rpm`` per minute) and a tokens bucket (capacity ``tpm_burst``, default ``tpm``, refilled at
``tpm`` per minute). A fresh key can spend its whole burst at once; then it gets ``limit / 60`` per second. This
is the behaviour OpenAI's ``x-ratelimit-*`` headers describe: ``remaining`` is what the bucket holds now, and
``reset`` is how long until it is full again.

Exact integer arithmetic, identical in Python and in Lua (whose numbers are doubles, exact below 2**53):
time is in milliseconds and a bucket level is in *units*, ``UNIT = 60_000`` units per request or token, so a
bucket with a limit of ``L`` per minute gains exactly ``L`` units per millisecond. Levels stay below
``MAX_LIMIT * UNIT`` (6e14), far inside the exact range of a double.

Operations, each atomic over all the buckets it names:

* ``acquire``: refill every bucket to *now*; if every bucket holds at least its cost, take the costs from all
  of them (all or nothing). Nothing is written when refused.
* ``adjust``: refill to *now*, then add an amount (a refund, or a negative extra charge; a bucket may go below
  zero, a debt that later admissions wait out), capped at capacity.

A bucket never seen (or expired: its key lives only until it would be full again) is full.
"""
from __future__ import annotations

import asyncio
import hashlib
from time import monotonic as _monotonic
from typing import Any, Sequence

__all__ = [
    "UNIT",
    "MemoryBackend",
    "RedisBackend",
    "BackendError",
    "LUA_SCRIPT",
    "transition",
    "format_duration",
]

UNIT = 60_000  #: units per request/token: a limit of L per minute refills exactly L units per millisecond


class BackendError(Exception):
    """The backend could not be reached or failed; the plugin's ``on_backend_error`` decides what happens."""


def transition(buckets: dict[str, tuple[int, int, int, int]], keys: Sequence[str], caps: Sequence[int],
               rates: Sequence[int], amounts: Sequence[int], acquire: bool, now: int) -> tuple[bool, list[int]]:
    """The transition, in Python, on a dict of buckets ``key -> (level, at_ms, capacity, rate)`` (a missing key
    is a full bucket). Returns (admitted, the level of each bucket after the operation).

    The Lua script below is this function, step for step; ``tests/test_ratelimit.py`` runs one scenario
    through both and compares every result and every stored bucket.
    """
    levels = []
    for i in range(len(keys)):
        cap = caps[i]
        state = buckets.get(keys[i])
        if state is None:
            level = cap
        else:
            level, at = state[0], state[1]
            if now > at:  # a clock that went backwards refills nothing
                level += (now - at) * rates[i]
                if level > cap:
                    level = cap
        levels.append(level)
    if acquire:
        for i in range(len(keys)):
            if levels[i] < amounts[i]:
                return False, levels  # all or nothing: nothing is written
    for i in range(len(keys)):
        cap = caps[i]
        level = levels[i] - amounts[i] if acquire else levels[i] + amounts[i]
        if level >= cap:
            levels[i] = cap
            buckets.pop(keys[i], None)  # full: forget it (a bucket never seen is full)
        else:
            levels[i] = level
            buckets[keys[i]] = (level, now, cap, rates[i])
    return True, levels


#: The same transition for Redis, run atomically. KEYS: one hash per bucket (fields l = level, t = ms).
#: ARGV[1]: now in ms, or '' for the Redis server's clock (always, outside tests: replicas with skewed clocks
#: agree); ARGV[2]: 'acquire' or 'adjust'; then capacity, rate, amount for each bucket.
#: Returns {admitted (1/0), now, level of each bucket after}.
LUA_SCRIPT = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local acquire = ARGV[2] == 'acquire'
local n = #KEYS
local levels = {}
for i = 1, n do
  local cap = tonumber(ARGV[3 * i])
  local rate = tonumber(ARGV[3 * i + 1])
  local s = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = cap
  if s[1] then
    level = tonumber(s[1])
    local at = tonumber(s[2])
    if now > at then  -- a clock that went backwards refills nothing
      level = level + (now - at) * rate
      if level > cap then level = cap end
    end
  end
  levels[i] = level
end
local ok = 1
if acquire then
  for i = 1, n do
    if levels[i] < tonumber(ARGV[3 * i + 2]) then ok = 0 end  -- all or nothing: nothing is written
  end
end
if ok == 1 then
  for i = 1, n do
    local cap = tonumber(ARGV[3 * i])
    local rate = tonumber(ARGV[3 * i + 1])
    local amount = tonumber(ARGV[3 * i + 2])
    local level
    if acquire then level = levels[i] - amount else level = levels[i] + amount end
    if level >= cap then
      levels[i] = cap
      redis.call('DEL', KEYS[i])  -- full: forget it (a bucket never seen is full)
    else
      levels[i] = level
      redis.call('HSET', KEYS[i], 'l', string.format('%d', level), 't', string.format('%d', now))
      -- expire when it would be full again: nothing is lost
      redis.call('PEXPIRE', KEYS[i], string.format('%d', math.ceil((cap - level) / rate) + 1000))
    end
  end
end
local out = {ok, now}
for i = 1, n do out[i + 2] = levels[i] end
return out
"""

LUA_SHA = hashlib.sha1(LUA_SCRIPT.encode()).hexdigest()


def format_duration(ms: int) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it (Go style): ``6ms``, ``1s``, ``1.5s``,
    ``1m0s``, ``6m30.25s``, ``1h0m0s``; ``0s`` for zero."""
    if ms < 1000:
        return f"{ms}ms" if ms > 0 else "0s"
    minutes, rest = divmod(ms, 60_000)
    seconds, millis = divmod(rest, 1000)
    text = f"{seconds}.{millis:03d}".rstrip("0") + "s" if millis else f"{seconds}s"
    if not minutes:
        return text
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{text}" if hours else f"{minutes}m{text}"


class MemoryBackend:
    """Buckets in this process's memory; the clock is ``time.monotonic`` in milliseconds."""

    name = "memory"
    _SWEEP_EVERY = 4096

    def __init__(self) -> None:
        #: key -> (level, at_ms, capacity, rate)
        self.buckets: dict[str, tuple[int, int, int, int]] = {}
        self._ops = 0

    async def start(self, gateway: Any) -> None:
        pass

    async def close(self) -> None:
        pass

    def run(self, keys: Sequence[str], caps: Sequence[int], rates: Sequence[int], amounts: Sequence[int],
            acquire: bool, now: int | None = None) -> tuple[bool, int, list[int]]:
        if now is None:
            now = int(_monotonic() * 1000)
        ok, levels = transition(self.buckets, keys, caps, rates, amounts, acquire, now)
        self._ops += 1
        if self._ops >= self._SWEEP_EVERY:
            self._ops = 0
            self.sweep(now)
        return ok, now, levels

    def sweep(self, now: int) -> None:
        """Forget buckets that have refilled to capacity (they are full, like a bucket never seen)."""
        full = [k for k, (level, at, cap, rate) in self.buckets.items() if level + (now - at) * rate >= cap]
        for key in full:
            del self.buckets[key]

    async def acquire(self, keys: Sequence[str], caps: Sequence[int], rates: Sequence[int],
                      costs: Sequence[int]) -> tuple[bool, int, list[int]]:
        return self.run(keys, caps, rates, costs, True)

    async def adjust(self, keys: Sequence[str], caps: Sequence[int], rates: Sequence[int],
                     amounts: Sequence[int]) -> tuple[bool, int, list[int]]:
        return self.run(keys, caps, rates, amounts, False)


class RedisBackend:
    """Buckets in the shared Redis, one EVALSHA per operation (script loaded once, reloaded after NOSCRIPT)."""

    name = "redis"

    def __init__(self) -> None:
        self.redis: Any = None
        self.sha = LUA_SHA

    async def start(self, gateway: Any) -> None:
        self.redis = gateway.redis

    async def close(self) -> None:
        pass

    async def load_script(self) -> None:
        try:
            self.sha = await self.redis.script_load(LUA_SCRIPT)
        except Exception as exc:  # noqa: BLE001 - any client failure is a backend failure
            raise BackendError(_describe(exc)) from exc

    async def run(self, keys: Sequence[str], caps: Sequence[int], rates: Sequence[int], amounts: Sequence[int],
                  acquire: bool, now: int | None = None) -> tuple[bool, int, list[int]]:
        from redis.exceptions import NoScriptError

        args: list[Any] = ["" if now is None else now, "acquire" if acquire else "adjust"]
        for cap, rate, amount in zip(caps, rates, amounts):
            args += (cap, rate, amount)
        try:
            try:
                reply = await self.redis.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:  # Redis restarted (or SCRIPT FLUSH): load it again, once
                self.sha = await self.redis.script_load(LUA_SCRIPT)
                reply = await self.redis.evalsha(self.sha, len(keys), *keys, *args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, READONLY, OOM, ...
            raise BackendError(_describe(exc)) from exc
        return bool(reply[0]), int(reply[1]), [int(v) for v in reply[2:]]

    async def acquire(self, keys: Sequence[str], caps: Sequence[int], rates: Sequence[int],
                      costs: Sequence[int]) -> tuple[bool, int, list[int]]:
        return await self.run(keys, caps, rates, costs, True)

    async def adjust(self, keys: Sequence[str], caps: Sequence[int], rates: Sequence[int],
                     amounts: Sequence[int]) -> tuple[bool, int, list[int]]:
        return await self.run(keys, caps, rates, amounts, False)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
