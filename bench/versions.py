"""Two checkouts of the service side by side: req/s of each, started alternately.

    python -m bench.versions --baseline /path/to/other/checkout [--models demo,vgg19]
        [--clients 1,16] [--duration 20] [--rounds 2]

Each round starts this checkout's server and the baseline's (``python -m service`` run
from each tree, with the service's default settings) on the same store, one after the
other, and puts each under closed-loop load. The ratio is this checkout's req/s over the
baseline's, per model and client count; every round is reported. This is how a change
to the runtime proves it costs nothing (e.g. the plain thread rule against the thread
trials it replaced): make the baseline with ``git worktree add /tmp/prev <commit>``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import device_name, write_result
from model_store import ModelStore
from tests.support.servers import REPO, launch_server
from tests.support.serving import RequestImages, demo_model, run_load, vgg19_model


def _commit(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout")
    ap.add_argument("--models", default="demo,vgg19")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a PROTOPNET_ setting for this checkout's server only (e.g. torch_threads=1)",
    )  # fmt: skip
    ap.add_argument("--out", default="versions", help="result name: bench/results/<out>.json")
    args = ap.parse_args(argv)
    this_settings = dict(kv.split("=", 1) for kv in args.set)
    clients = [int(c) for c in args.clients.split(",")]
    trees = {"this": REPO, "baseline": args.baseline.resolve()}
    out: dict[str, Any] = {
        "device": device_name(),
        "commits": {k: _commit(t) for k, t in trees.items()},
        "this_settings": this_settings,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as d:
        tmp = Path(d)
        for model in args.models.split(","):
            source = vgg19_model(tmp / "store") if model == "vgg19" else demo_model(tmp / "store")
            images = RequestImages(ModelStore(source.store).load(source.ref).manifest.preprocessing)
            rps: dict[str, dict[int, list[float]]] = {k: {c: [] for c in clients} for k in trees}
            for rnd in range(args.rounds):
                for key, tree in trees.items():
                    server = launch_server(
                        tmp, source.store, cwd=tree, env_extra={"PYTHONPATH": str(tree)},
                        default_model=source.ref, models=source.ref, log_level="warning",
                        **{"worker_threads": None, "torch_threads": None,
                           **(this_settings if key == "this" else {})},
                    )  # fmt: skip
                    try:
                        server.wait("/readyz", timeout=300)
                        for c in clients:
                            first = 10_000 * (rnd + 1) + 1000 * c
                            run_load(server.url, images, c, args.warmup, first_index=first)
                            run = run_load(
                                server.url, images, c, args.duration, first_index=first + 500
                            )
                            if run.failures():
                                raise RuntimeError(f"{key}: failed requests {run.statuses()}")
                            r = len(run.ok()) / (run.ended - run.started)
                            rps[key][c].append(r)
                            print(
                                f"{model} round {rnd} {key:8s} {c:2d} clients: {r:7.1f} req/s",
                                flush=True,
                            )
                    finally:
                        server.stop()
            res: dict[str, Any] = {}
            for c in clients:
                this, base = rps["this"][c], rps["baseline"][c]
                res[f"clients_{c}"] = {
                    "this_req_s": this,
                    "baseline_req_s": base,
                    "ratio_of_medians": statistics.median(this) / statistics.median(base),
                }
                print(
                    f"{model} {c:2d} clients: this/baseline x{res[f'clients_{c}']['ratio_of_medians']:.3f}"
                )
            out["models"][model] = res
    write_result(args.out, out)
    return out


if __name__ == "__main__":
    main()
