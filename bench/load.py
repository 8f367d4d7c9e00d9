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
from tests.support.load import RSS_GROWTH_LIMIT_MB, measure
from tests.support.serving import demo_model


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
