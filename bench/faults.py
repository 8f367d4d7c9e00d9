"""Faults a deployment meets, provoked on real processes; what a client and an operator see.

    python -m bench.faults [--quick] [--only redis,sigterm,corrupt,training,fuzz]

- redis:    Redis killed and restarted while 16 clients load the service.
- sigterm:  SIGTERM to uvicorn while 16 clients load it.
- corrupt:  a start-up model whose weights file was altered after publishing.
- training: ``python -m training train`` killed with SIGKILL mid-epoch, then ``--resume``.
- fuzz:     schemathesis against the running service's /openapi.json.

Each scenario returns plain observations (counts, statuses, log lines); the tests in
tests/reliability/ assert on them, and this command writes them to
bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import device_name, write_result
from tests.support.faults import (
    SCENARIOS,
    corrupted_artifact,
    fuzz,
    redis_outage,
    sigterm_under_load,
    training_kill_resume,
)
from tests.support.serving import demo_model

# -- the command ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter load phases and fuzzing")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    ap.add_argument("--fuzz-seconds", type=float, default=90.0)
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    scale = 0.5 if args.quick else 1.0
    result: dict[str, Any] = {"device": device_name(), "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as d:
        tmp = Path(d)
        source = demo_model(tmp / "store", prefer_trained=False)
        runs = {
            "redis": lambda: redis_outage(
                tmp, source, before_s=4 * scale, down_s=6 * scale, after_s=4 * scale
            ),
            "sigterm": lambda: sigterm_under_load(tmp, source, term_after_s=5 * scale),
            "corrupt": lambda: corrupted_artifact(tmp),
            "training": lambda: training_kill_resume(tmp / "training"),
            "fuzz": lambda: fuzz(tmp, source, max_time_s=args.fuzz_seconds * scale),
        }
        for name in chosen:
            t0 = time.monotonic()
            obs = runs[name]()
            obs["scenario_seconds"] = round(time.monotonic() - t0, 1)
            result["scenarios"][name] = obs
            shown = {k: v for k, v in obs.items() if not k.endswith("tail")}
            print(f"{name}: {json.dumps(shown, default=str)}", flush=True)
    write_result("faults", result)
    return result


if __name__ == "__main__":
    main()
