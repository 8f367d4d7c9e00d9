"""The explanation cache against a real redis-server: sharing, TTL, outage, recovery."""

from __future__ import annotations

import asyncio

from service.cache import ExplanationCache, LocalLRU
from service.metrics import Metrics
from tests.support.servers import RedisProcess, free_port


def test_local_lru_is_bounded_by_entries_and_bytes() -> None:
    lru = LocalLRU(max_entries=3, max_bytes=100)
    for i in range(5):
        lru.put(f"k{i}", {"json": b"x" * 10})
    assert len(lru) == 3 and lru.get("k0", "json") is None and lru.get("k4", "json") == b"x" * 10
    lru.get("k2", "json")  # k2 becomes the most recent
    lru.put("big", {"json": b"y" * 80})
    assert lru.nbytes <= 100 and lru.get("k2", "json") is not None and lru.get("k3", "json") is None
    lru.put("huge", {"json": b"z" * 101})  # larger than the whole cache: not kept
    assert lru.get("huge", "json") is None and lru.nbytes <= 100


def _cache(url: str | None, ttl: int = 60) -> ExplanationCache:
    return ExplanationCache(url, ttl, 16, 1 << 20, Metrics(), timeout_s=0.3, retry_s=0.2)


def test_two_caches_share_entries_through_redis(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a, b = _cache(redis_server.url, ttl=30), _cache(redis_server.url)
        await a.start()
        await b.start()
        assert a.state == b.state == "ok"
        await a.put("e1", {"json": b"{}", "render": b"\x00\x01"})
        assert await b.get("e1", "render", count=True) == b"\x00\x01"
        assert b.metrics.cache_hits.labels("redis")._value.get() == 1
        assert await b.get("e1", "render", count=True) == b"\x00\x01"  # now from its LRU
        assert b.metrics.cache_hits.labels("local")._value.get() == 1
        assert await b.get("nope", "json", count=True) is None
        assert b.metrics.cache_misses._value.get() == 1
        await a.close()
        await b.close()

    asyncio.run(main())
    assert 0 < redis_server.client().ttl("protopnet:exp:e1") <= 30


def test_many_fields_come_from_the_local_layer_then_one_redis_read(
    redis_server: RedisProcess,
) -> None:
    async def main() -> tuple[dict, dict, dict, dict]:
        a, b = _cache(redis_server.url), _cache(redis_server.url)
        await a.start()
        await b.start()
        await a.put("e4", {"png:1": b"one", "png:2": b"two"})
        await b.put("e4", {"png:3": b"three"})  # b holds png:3 locally and in Redis
        redis_server.client().hset("protopnet:exp:e4", "png:3", b"changed in Redis")
        wanted = ["png:1", "png:2", "png:3", "png:9"]
        first = await b.get_many("e4", wanted)  # png:3 from b's LRU, 1 and 2 from Redis
        redis_server.client().delete("protopnet:exp:e4")
        second = await b.get_many("e4", wanted)  # all three now in b's LRU
        nothing = await b.get_many("never-made", wanted)
        await a.close()
        await b.close()
        offline = _cache(None)
        await offline.put("e5", {"png:1": b"x"})
        return first, second, nothing, await offline.get_many("e5", ["png:1", "png:2"])

    first, second, nothing, offline = asyncio.run(main())
    assert first == {"png:1": b"one", "png:2": b"two", "png:3": b"three"}
    assert second == first and nothing == {} and offline == {"png:1": b"x"}


def test_outage_degrades_to_the_local_cache_and_recovers() -> None:
    r = RedisProcess(free_port())
    r.start()

    async def main() -> None:
        c = _cache(r.url)
        await c.start()
        assert c.state == "ok"
        r.stop()
        await c.put("e2", {"json": b"during outage"})  # fails over Redis, kept locally
        assert c.state == "degraded" and c.last_error
        assert c.metrics.redis_up._value.get() == 0
        assert await c.get("e2", "json") == b"during outage"
        r.start()
        for _ in range(50):
            if c.state == "ok":
                break
            await asyncio.sleep(0.1)
        assert c.state == "ok" and c.metrics.redis_up._value.get() == 1
        await c.put("e3", {"json": b"after"})
        assert r.client().hget("protopnet:exp:e3", "json") == b"after"
        await c.close()

    try:
        asyncio.run(main())
    finally:
        r.stop()


def test_unreachable_at_start_is_degraded_not_fatal() -> None:
    async def main() -> None:
        c = _cache(f"redis://127.0.0.1:{free_port()}/0")
        await c.start()
        assert c.state == "degraded"
        await c.put("e4", {"json": b"x"})
        assert await c.get("e4", "json") == b"x"
        await c.close()
        local = _cache(None)
        await local.start()
        assert local.state == "local"

    asyncio.run(main())


def test_a_transport_closed_mid_call_degrades_like_any_outage() -> None:
    """uvloop raises RuntimeError, not a RedisError, for a connection that Redis drops
    during redis-py's handshake; it must degrade the cache, not fail the request."""

    class DroppedConnection:
        async def hget(self, *args: object) -> bytes:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        def pipeline(self, **kwargs: object) -> object:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        async def ping(self) -> bool:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    async def main() -> None:
        c = _cache(None)
        await c.start()
        c.redis_url = "redis://127.0.0.1:1/0"
        c._redis, c._up = DroppedConnection(), True  # a Redis that was up until now
        await c.put("e5", {"json": b"y"})  # kept locally despite the error
        assert c.state == "degraded" and "TCPTransport" in (c.last_error or "")
        c._up = True
        assert await c.get("e6", "json") is None  # a miss, not an exception
        assert c.state == "degraded"
        assert await c.get("e5", "json") == b"y"
        await c.close()

    asyncio.run(main())
