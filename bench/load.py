"""Sustained load: 16 concurrent clients for 60 s against the demo model, with Redis.

    python -m bench.load [--quick] [--duration 60] [--warmup 10] [--clients 16]

Every request is a new image (each costs a forward pass and fills the caches, the
worst case for memory). Checks: no 5xx, latency percentiles, and the server process's
resident memory growth after the warm-up, which must stay under 100 MB: the in-process
cache is bounded and nothing else may grow with the number of requests served.
Writes bench/results/load.json with requests, errors_5xx, p50_ms, p99_ms, rss_growth_mb.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.common import device_name, write_result
from bench.serving import ModelSource, RequestImages, RssSampler, demo_model, run_load, serve
from model_store import ModelStore
from tests.service.conftest import RedisProcess, free_port

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="15 s after a 5 s warm-up")
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--store", type=Path, help="store with the trained demo (default ./store)")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 15.0, 5.0
    with tempfile.TemporaryDirectory(prefix="bench-load-") as d:
        source = demo_model(Path(d) / "store", args.store)
        result: dict[str, Any] = {"device": device_name()}
        result.update(measure(Path(d), source, args.clients, args.duration, args.warmup))
    print(
        f"load: {args.clients} clients x {args.duration:.0f} s: {result['requests']} requests "
        f"({result['rps']} req/s), 5xx {result['errors_5xx']}, failed {result['failed']}, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, RSS "
        f"{result['rss_after_warmup_mb']} -> {result['rss_end_mb']} MB "
        f"(growth {result['rss_growth_mb']} MB, limit {RSS_GROWTH_LIMIT_MB})"
    )
    write_result("load", result)
    return result


if __name__ == "__main__":
    main()
