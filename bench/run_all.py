"""Run every benchmark in sequence, each in its own process; print where results went.

    python -m bench.run_all [--quick] [--only explain_latency,load] [--skip accuracy]
    make bench                      # the same, full size

Each benchmark writes bench/results/<name>.json and prints its ratios. A benchmark that
fails does not stop the others; the exit status is 1 if any failed. ``--quick`` gives
each its smoke-run size (minutes in all instead of the better part of an hour). A
benchmark module not written yet is reported as missing, not as a failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
HELPERS = {"__init__", "common", "run_all"}  # modules that are not benchmarks
# Needs another checkout to compare against (--baseline): run by hand, not by run_all.
BY_HAND = {"versions"}

# Order: cheap in-process ones first, then the service, then the long training ones.
# name -> (full-size arguments, --quick arguments; None: left out of --quick runs)
PLAN: dict[str, tuple[list[str], list[str] | None]] = {
    "store": ([], ["--quick"]),
    "local_analysis": ([], ["--repeats", "1"]),
    "explain_latency": ([], ["--quick"]),
    "service_throughput": ([], ["--quick"]),
    "gil": ([], ["--quick"]),
    "explain_paths": ([], ["--quick"]),
    "memory_format": ([], ["--quick"]),
    "load": ([], ["--quick"]),
    "faults": ([], ["--quick"]),
    "push": ([], ["--cases", "demo", "synthetic"]),
    "training": ([], ["--steps", "5", "--cases", "demo", "synthetic"]),
    # Trains two models for many epochs; a smoke-size run would only overwrite the real
    # figure with a meaningless one.
    "accuracy": ([], None),
    # Needs the demo model in ./store (make demo publishes it) and reads no other.
    "faithfulness": ([], None),
    # Trains four synthetic models (about 1 min); the demo part re-exports runs/fashion-mnist.
    "interpretability": ([], ["--no-demo"]),
}


def supports(name: str, flag: str) -> bool:
    """Whether ``python -m bench.<name> --help`` lists ``flag``."""
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return flag in out.stdout


def discover() -> list[str]:
    """Every benchmark module: the planned order, then any new bench/*.py."""
    found = {p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in HELPERS | BY_HAND}
    return [n for n in PLAN if n in found] + sorted(found - set(PLAN))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="every benchmark at smoke-run size")
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    args = ap.parse_args(argv)
    available = discover()
    wanted = [n.strip() for n in args.only.split(",")] if args.only else list(PLAN)
    wanted += [n for n in available if n not in PLAN and not args.only]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = sorted((set(wanted) | skip) - set(PLAN) - set(available))
    if unknown:
        known = ", ".join(dict.fromkeys([*PLAN, *available]))
        ap.error(f"unknown benchmark(s) {unknown}; known: {known}")
    outcome: dict[str, str] = {}
    for name in wanted:
        if name in skip:
            continue
        if name not in available or importlib.util.find_spec(f"bench.{name}") is None:
            outcome[name] = f"missing (bench/{name}.py not written yet)"
            print(f"== {name}: missing, skipped", flush=True)
            continue
        full, quick = PLAN.get(name, ([], ["--quick"]))
        extra = full
        if args.quick:
            if quick is None:
                outcome[name] = "left out of --quick runs (run it without --quick)"
                print(f"== {name}: left out of --quick runs", flush=True)
                continue
            if quick == ["--quick"] and not supports(name, "--quick"):
                print(f"== {name}: has no --quick flag; running it at full size", flush=True)
                quick = []
            extra = quick
        cmd = [sys.executable, "-m", f"bench.{name}", *extra]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd, cwd=REPO)
        took = time.monotonic() - t0
        outcome[name] = (
            f"ok in {took:.0f} s" if rc == 0 else f"FAILED (exit {rc}) after {took:.0f} s"
        )
    print("\nbenchmarks:")
    for name, what in outcome.items():
        print(f"  {name:20s} {what}")
    print(f"results: {RESULTS_DIR}/<name>.json")
    return 1 if any(w.startswith("FAILED") for w in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
