"""Fail-over figures: nginx (the deployment's configuration) in front of three service
replicas and a Redis on loopback, 16 closed-loop clients; a replica SIGKILLed mid-load,
then a rolling restart (SIGTERM each replica in turn and start it again).

    python -m bench.replicas [--clients 16] [--phase 8]

Writes bench/results/replicas.json: per scenario (``scenarios.kill``,
``scenarios.rolling``) the requests, failed requests (goal 0), p99 before, during and
after, and how many explanation ids handed out could not be read back (goal 0).
Needs Debian's nginx (``apt-get install nginx``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.common import device_name, write_result
from model_store import ModelStore
from tests.support.replicas import run_scenarios
from tests.support.serving import RequestImages, demo_model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--phase", type=float, default=8.0, help="seconds before and after")
    ap.add_argument("--quick", action="store_true", help="3 s phases")
    args = ap.parse_args(argv)
    if args.quick:
        args.phase = 3.0
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as d:
        tmp = Path(d)
        source = demo_model(tmp / "store", prefer_trained=False)
        prep = ModelStore(source.store).load(source.ref).manifest.preprocessing
        scenarios = run_scenarios(
            tmp, source.store, RequestImages(prep), clients=args.clients, phase_s=args.phase,
            default_model=source.ref, models=source.ref, worker_threads=1, torch_threads=1,
        )  # fmt: skip
    for name, s in scenarios.items():
        print(
            f"{name:8s} {s['requests']} requests, {s['failed']} failed, p99 "
            f"{s['p99_ms_before']} / {s['p99_ms_during']} / {s['p99_ms_after']} ms "
            f"(before / during / after), {s['ids_unreadable']} of {s['ids']} ids unreadable"
        )
    out = {"device": device_name(), "replicas": 3, "clients": args.clients, "scenarios": scenarios}
    write_result("replicas", out)
    return out


if __name__ == "__main__":
    main()
