"""Storage for the ``cache`` plugin: aiocache backends and the entry codec.

* :class:`LRUMemoryCache` — an aiocache backend bounded in entries and bytes, least recently used out first,
  with lazy TTL expiry (no timer per entry, unlike aiocache's ``SimpleMemoryCache``).
* :class:`SharedRedisCache` — aiocache's ``RedisCache`` running its commands on the gateway's shared
  ``redis.asyncio`` client (one pool per process), and never closing it.
* :func:`encode_entry` / :func:`decode_entry` — an entry is JSON, optionally zlib-compressed, behind a one-byte
  tag, so turning compression on or off never makes stored entries unreadable.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from time import monotonic
from typing import Any

import orjson
from aiocache import RedisCache
from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer

__all__ = ["LRUMemoryCache", "SharedRedisCache", "encode_entry", "decode_entry", "ENTRY_VERSION"]

#: Bumped when the stored entry layout changes; entries of another version are ignored (a miss).
ENTRY_VERSION = 1
_RAW = b"J"  # tag: plain JSON follows
_ZLIB = b"Z"  # tag: zlib-compressed JSON follows


class _BytesSerializer(BaseSerializer):
    """Values are already bytes (see :func:`encode_entry`): store and return them untouched."""

    DEFAULT_ENCODING = None

    def dumps(self, value: bytes) -> bytes:  # type: ignore[override]
        return value

    def loads(self, value: bytes | None) -> bytes | None:  # type: ignore[override]
        return value


def encode_entry(entry: dict[str, Any], compress: bool, min_bytes: int) -> bytes:
    """Serialize an entry; zlib-compress it when asked and it is at least ``min_bytes`` long and it helps."""
    data = orjson.dumps(entry)
    if compress and len(data) >= min_bytes:
        packed = zlib.compress(data, 6)
        if len(packed) < len(data):
            return _ZLIB + packed
    return _RAW + data


def decode_entry(blob: bytes | None) -> dict[str, Any] | None:
    """The entry stored in ``blob``; None when absent, corrupt or of another entry version."""
    if not blob:
        return None
    tag, body = blob[:1], blob[1:]
    try:
        if tag == _ZLIB:
            body = zlib.decompress(body)
        elif tag != _RAW:
            return None
        entry = orjson.loads(body)
    except (zlib.error, orjson.JSONDecodeError):
        return None
    if not isinstance(entry, dict) or entry.get("v") != ENTRY_VERSION:
        return None
    return entry


class LRUMemoryCache(BaseCache):
    """In-process aiocache backend: at most ``max_entries`` entries and ``max_bytes`` bytes (keys + values).

    Reads move an entry to the most recently used end; writes evict from the other end until both bounds
    hold. TTLs are deadlines checked when an entry is read (or reaches the eviction end), so an expired entry
    costs memory until then but is never served. Operations run without aiocache's per-call timeout (there is
    no I/O to wait for).
    """

    NAME = "lru-memory"

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 256 * 2**20, **kwargs: Any) -> None:
        super().__init__(serializer=_BytesSerializer(), timeout=None, **kwargs)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def _build_key(self, key: str, namespace: str | None = None) -> str:
        return key if not namespace else f"{namespace}:{key}"

    async def resize(self, max_entries: int, max_bytes: int) -> None:
        """New bounds (a reloaded config); evicts least recently used entries until they hold."""
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._evict()

    def _evict(self) -> None:
        data = self._data
        while len(data) > self.max_entries or self.bytes > self.max_bytes:
            old_key, (old_value, deadline) = data.popitem(last=False)
            self.bytes -= len(old_key) + len(old_value)
            if deadline is None or deadline > monotonic():
                self.evictions += 1  # an expired entry leaving is not an eviction

    def __len__(self) -> int:
        return len(self._data)

    def _drop(self, key: str) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self.bytes -= len(key) + len(item[0])
        return True

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, deadline = item
        if deadline is not None and deadline <= monotonic():
            self._drop(key)
            return None
        return value

    async def _get(self, key: str, encoding: Any = None, _conn: Any = None) -> bytes | None:
        value = self._live(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    async def _gets(self, key: str, encoding: Any = None, _conn: Any = None) -> bytes | None:
        return await self._get(key)

    async def _multi_get(self, keys: list[str], encoding: Any = None, _conn: Any = None) -> list[bytes | None]:
        return [await self._get(key) for key in keys]

    async def _set(self, key: str, value: bytes, ttl: float | None = None, _cas_token: Any = None,
                   _conn: Any = None) -> bool:
        if _cas_token is not None and _cas_token != self._live(key):
            return False
        size = len(key) + len(value)
        self._drop(key)
        if size > self.max_bytes:
            return False
        self._data[key] = (value, monotonic() + ttl if ttl else None)
        self.bytes += size
        self._evict()
        return True

    async def _multi_set(self, pairs: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        for key, value in pairs:
            await self._set(key, value, ttl)
        return True

    async def _add(self, key: str, value: bytes, ttl: float | None = None, _conn: Any = None) -> bool:
        if self._live(key) is not None:
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        return await self._set(key, value, ttl)

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self._live(key) is not None

    async def _increment(self, key: str, delta: int, _conn: Any = None) -> int:
        raise TypeError("the cache's memory backend stores bytes, not counters")

    async def _expire(self, key: str, ttl: float, _conn: Any = None) -> bool:
        value = self._live(key)
        if value is None:
            return False
        self._data[key] = (value, monotonic() + ttl if ttl else None)
        return True

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return int(self._drop(key))

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        if namespace:
            for key in [k for k in self._data if k.startswith(namespace)]:
                self._drop(key)
        else:
            self._data.clear()
            self.bytes = 0
        return True

    async def _raw(self, command: str, *args: Any, encoding: Any = None, _conn: Any = None, **kwargs: Any) -> Any:
        return getattr(self._data, command)(*args, **kwargs)

    async def _redlock_release(self, key: str, value: Any) -> int:
        if self._live(key) == value:
            return int(self._drop(key))
        return 0

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        return None


class SharedRedisCache(RedisCache):
    """aiocache's Redis backend on an existing ``redis.asyncio.Redis`` client.

    aiocache 0.12 builds its own ``ConnectionPool`` from host/port arguments and has no parameter for an
    existing client or pool. Its ``connection_pool_class`` hook is used to hand it the shared client's pool
    (so no second pool is ever created), then ``client`` is the shared client itself, so every command uses the
    gateway's pool, timeouts and retry policy. ``close()`` leaves the client open: the gateway owns it.
    """

    def __init__(self, client: Any, **kwargs: Any) -> None:
        pool = client.connection_pool
        super().__init__(serializer=_BytesSerializer(), connection_pool_class=lambda **_: pool, **kwargs)
        self.client = client

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        return None
