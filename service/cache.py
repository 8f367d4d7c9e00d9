"""The explanation cache: Redis shared by every replica, a bounded in-process LRU below it.

An entry is one explanation id holding named byte fields: "json" (the explanation),
"render" (safetensors: low-resolution maps + geometry, and a small display image's
pixels), "image" (the display-size JPEG of a larger one),
and PNGs rendered later ("png:<prototype>:<style>", "boxes"). Every field is immutable
for its id, so the two layers never disagree; Redis entries expire after a TTL.

When Redis stops answering, the cache marks itself degraded, keeps serving from (and
writing to) the LRU, and a background task pings Redis until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.metrics import Metrics

log = logging.getLogger("service.cache")

KEY_PREFIX = "protopnet:exp:"
CacheState = Literal["ok", "degraded", "local"]
# What a Redis call raises when the server goes away. Besides redis-py's own errors and
# socket errors: under uvloop, a connection the server drops during redis-py's connect
# handshake raises RuntimeError ("unable to perform operation on <TCPTransport
# closed=True>"), which reached a client as a 500 while Redis was being killed.
REDIS_DOWN = (RedisError, OSError, RuntimeError)


class LocalLRU:
    """Least-recently-used entries of byte fields, bounded by count and total bytes."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._data: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, field: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None or field not in entry:
            return None
        self._data.move_to_end(key)
        return entry[field]

    def put(self, key: str, fields: dict[str, bytes]) -> None:
        size = sum(len(v) for v in fields.values())
        if size > self.max_bytes:
            return  # one giant entry would evict everything else
        entry = self._data.setdefault(key, {})
        for f, v in fields.items():
            self.nbytes += len(v) - len(entry.get(f, b""))
            entry[f] = v
        self._data.move_to_end(key)
        while self._data and (len(self._data) > self.max_entries or self.nbytes > self.max_bytes):
            _, old = self._data.popitem(last=False)
            self.nbytes -= sum(len(v) for v in old.values())


# Writes an entry's first fields unless another writer (a replica that computed the same
# explanation at the same time) got there first; then returns that one's JSON. So every
# client is handed one body per id, whichever replica computed it.
_PUT_FIRST = """
local stored = redis.call('HGET', KEYS[1], 'json')
if stored then return stored end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return false
"""


class ExplanationCache:
    """Get and put explanation fields; Redis when reachable, the LRU always."""

    def __init__(
        self,
        redis_url: str | None,
        ttl_s: int,
        max_entries: int,
        max_bytes: int,
        metrics: Metrics,
        timeout_s: float = 0.5,
        retry_s: float = 2.0,
    ):
        self.redis_url, self.ttl_s = redis_url, ttl_s
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.local = LocalLRU(max_entries, max_bytes)
        self.metrics = metrics
        self._redis: aioredis.Redis | None = None
        self._up = False
        self._reconnect: asyncio.Task | None = None
        self.last_error: str | None = None

    # -- state ------------------------------------------------------------------------
    @property
    def state(self) -> CacheState:
        if self.redis_url is None:
            return "local"
        return "ok" if self._up else "degraded"

    async def start(self) -> None:
        if self.redis_url is None:
            return
        self._redis = aioredis.Redis.from_url(
            self.redis_url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            # One immediate retry: a pooled connection may be stale after a Redis restart.
            retry=Retry(NoBackoff(), 1),
        )
        if await self._ping():
            self._mark_up()
        else:
            self._mark_down(self.last_error or "no answer")

    async def close(self) -> None:
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()  # type: ignore[attr-defined]  # stubs lag redis 5

    async def _ping(self) -> bool:
        assert self._redis is not None
        try:
            return bool(await self._redis.ping())
        except REDIS_DOWN as e:
            self.last_error = str(e) or type(e).__name__
            return False

    def _mark_up(self) -> None:
        if not self._up:
            log.info("redis reachable at %s", self.redis_url)
        self._up, self.last_error = True, None
        self.metrics.redis_up.set(1)

    def _mark_down(self, why: str) -> None:
        if self._up or self._reconnect is None:
            log.warning("redis unreachable (%s); serving from the in-process cache", why)
        self._up, self.last_error = False, why
        self.metrics.redis_up.set(0)
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            if await self._ping():
                self._mark_up()
                return

    # -- fields -----------------------------------------------------------------------
    async def get(self, key: str, field: str, count: bool = False) -> bytes | None:
        """One field of an entry; ``count`` records a hit or miss in the metrics."""
        value = self.local.get(key, field)
        if value is not None:
            if count:
                self.metrics.cache_hits.labels("local").inc()
            return value
        if self._redis is not None and self._up:
            try:
                value = await self._redis.hget(KEY_PREFIX + key, field)
            except REDIS_DOWN as e:
                self._mark_down(str(e) or type(e).__name__)
                value = None
            if value is not None:
                self.local.put(key, {field: value})
                if count:
                    self.metrics.cache_hits.labels("redis").inc()
                return bytes(value)
        if count:
            self.metrics.cache_misses.inc()
        return None

    async def get_many(self, key: str, fields: list[str]) -> dict[str, bytes]:
        """The fields of an entry that either layer has: local first, then one Redis
        round trip for the rest (a missing field is left out of the result)."""
        found = {f: v for f in fields if (v := self.local.get(key, f)) is not None}
        missing = [f for f in fields if f not in found]
        if missing and self._redis is not None and self._up:
            try:
                values = await self._redis.hmget(KEY_PREFIX + key, missing)
            except REDIS_DOWN as e:
                self._mark_down(str(e) or type(e).__name__)
                values = []
            fetched = {f: bytes(v) for f, v in zip(missing, values, strict=False) if v is not None}
            if fetched:
                self.local.put(key, fetched)
                found.update(fetched)
        return found

    async def put_first(self, key: str, fields: dict[str, bytes]) -> bytes:
        """Store a new entry (its "json" and the fields made with it) unless Redis has
        one already; returns the JSON that is kept: ``fields["json"]`` or the other's."""
        if self._redis is not None and self._up:
            args: list[bytes | str | int] = [self.ttl_s]
            for f, v in fields.items():
                args += [f, v]
            try:
                stored = await self._redis.eval(_PUT_FIRST, 1, KEY_PREFIX + key, *args)
            except REDIS_DOWN as e:
                self._mark_down(str(e) or type(e).__name__)
            else:
                if stored is not None:  # the other writer's fields stay in Redis alone
                    self.local.put(key, {"json": bytes(stored)})
                    return bytes(stored)
        self.local.put(key, fields)
        return fields["json"]

    async def put(self, key: str, fields: dict[str, bytes]) -> None:
        """Store fields of an entry in both layers; Redis failures only degrade."""
        self.local.put(key, fields)
        if self._redis is None or not self._up:
            return
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(KEY_PREFIX + key, mapping=fields)  # type: ignore[arg-type]
                pipe.expire(KEY_PREFIX + key, self.ttl_s)
                await pipe.execute()
        except REDIS_DOWN as e:
            self._mark_down(str(e) or type(e).__name__)
