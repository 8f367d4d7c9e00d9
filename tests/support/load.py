"""Sustained load against a fresh server and Redis: the figures ``python -m bench.load``
records and tests/reliability/test_load.py asserts on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_store import ModelStore
from tests.support.servers import RedisProcess, free_port
from tests.support.serving import ModelSource, RequestImages, RssSampler, run_load, serve

RSS_GROWTH_LIMIT_MB = 100.0


def measure(
    tmp: Path,
    source: ModelSource,
    clients: int = 16,
    duration_s: float = 60.0,
    warmup_s: float = 10.0,
) -> dict[str, Any]:
    """Run the load against a fresh server (and Redis); the figures a user compares.

    Requests sent during the first ``warmup_s`` seconds count for errors but not for
    latency; memory growth is measured from the end of the warm-up to the end.
    """
    images = RequestImages(ModelStore(source.store).load(source.ref).manifest.preprocessing)
    redis = RedisProcess(free_port())
    redis.start()
    server = None
    try:
        server = serve(tmp, source, redis_url=redis.url, log_level="warning")
        with RssSampler(server.proc.pid, every_s=0.5) as rss:
            run = run_load(server.url, images, clients, warmup_s + duration_s)
        t_warm = run.started + warmup_s
        measured = [s for s in run.samples if s.start >= t_warm]
        rss_warm, rss_end = rss.at(t_warm), rss.at(run.ended)
        after = [mb for t, mb in rss.samples if t >= t_warm]
        cached = len(redis.client().keys("protopnet:exp:*"))
        result = {
            "model": source.ref,
            "trained_weights": source.trained,
            "clients": clients,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "requests": len(measured),
            "requests_total": len(run.samples),
            "statuses": run.statuses(),
            "errors_5xx": run.errors_5xx(),
            "failed": len(run.failures()),
            "rps": round(len([s for s in measured if s.status == 200]) / duration_s, 1),
            "p50_ms": run.percentile_ms(50, since=t_warm),
            "p99_ms": run.percentile_ms(99, since=t_warm),
            "rss_start_mb": round(rss.samples[0][1], 1),
            "rss_after_warmup_mb": round(rss_warm, 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_max_after_warmup_mb": round(max(after), 1) if after else None,
            "rss_growth_mb": round(rss_end - rss_warm, 1),
            "rss_growth_limit_mb": RSS_GROWTH_LIMIT_MB,
            "explanations_in_redis": cached,
            "server_log_tail": server.log()[-2000:] if run.errors_5xx() else "",
        }
    finally:
        if server is not None:
            server.stop()
        redis.stop()
    return result
