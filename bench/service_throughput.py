"""Requests per second through uvicorn with 1, 4 and 16 concurrent clients, the
micro-batcher on and off: p50/p99 latency and the mean batch size the server formed.

    python -m bench.service_throughput [--quick] [--duration 10] [--clients 1,4,16]

Each setting gets its own server process serving the demo model (the trained one from
./store when present, else a random-weight model of its architecture). Every request
is a new image (no cache hits), so each one costs a forward pass. The clients are
closed-loop (each sends its next request when the last is answered) and run in this
process, on the same machine as the server: on these 2-core machines they compete
with it for the CPU, which the ratios share alike.

"batched": the service's defaults (max_batch 16, max_wait_ms 5);
"unbatched": max_batch 1. The mean batch size comes from the server's /metrics.
Goal on a GPU: 16 clients give at least 3x the throughput of 1 client.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import device_name, seconds_of, write_result
from model_store import ModelStore
from protokit.devices import pick_device
from protokit.threads import on_scratch_thread
from tests.support.serving import RequestImages as Images
from tests.support.serving import demo_model, metric_sum, run_load, serve, vgg19_model

MODES: dict[str, dict[str, Any]] = {"batched": {}, "unbatched": {"max_batch": 1}}


def _batches(url: str, model: str) -> tuple[float, float]:
    """(images, forward passes) the server has run for ``model`` so far."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return (
        metric_sum(text, "protopnet_batch_size_sum", model=model),
        metric_sum(text, "protopnet_batch_size_count", model=model),
    )


def bare_forward_img_per_s(store: Path, ref: str, batch: int = 16, repeats: int = 5) -> float:
    """Images per second of the bare batched forward (with the similarity maps), in this
    process, on the device the service would pick, in channels-last: the service's limit."""

    def run() -> float:
        model = ModelStore(store).load(ref).model
        dev = pick_device("auto")
        model = model.to(dev).to(memory_format=torch.channels_last).eval()
        S = ModelStore(store).manifest(ref).preprocessing.img_size
        x = torch.rand(batch, 3, S, S).to(dev, memory_format=torch.channels_last)

        def once() -> None:
            with torch.inference_mode():
                out = model.forward_full(x)
                model.similarity(out.distances)

        once()
        return batch / min(seconds_of(once, dev) for _ in range(repeats))

    return on_scratch_thread(run)


def measure(
    tmp: Path,
    clients: list[int],
    duration_s: float,
    warmup_s: float,
    store_root: Path | None = None,
    model: str = "demo",
) -> dict[str, Any]:
    if model == "vgg19":
        source = vgg19_model(tmp / "store")
    else:
        source = demo_model(tmp / "store", store_root)
    label = source.resolved()
    images = Images(ModelStore(source.store).load(source.ref).manifest.preprocessing)
    out: dict[str, Any] = {
        "model": source.ref,
        "trained_weights": source.trained,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "modes": {},
    }
    index = 0
    for mode, settings in MODES.items():
        server = serve(tmp, source, log_level="warning", **settings)
        rows: dict[str, Any] = {}
        try:
            for n in clients:
                run_load(server.url, images, n, warmup_s, first_index=index)  # untimed
                index += 1_000_000
                before = _batches(server.url, label)
                cpu0 = time.process_time()
                run = run_load(server.url, images, n, duration_s, first_index=index)
                client_cpu = (time.process_time() - cpu0) / max(run.ended - run.started, 1e-9)
                index += 1_000_000
                after = _batches(server.url, label)
                passes = after[1] - before[1]
                rows[str(n)] = {
                    "requests": len(run.samples),
                    "non_200": len(run.failures()),
                    "statuses": run.statuses(),
                    "rps": round(run.throughput(), 1),
                    "p50_ms": run.percentile_ms(50),
                    "p99_ms": run.percentile_ms(99),
                    "mean_batch": round((after[0] - before[0]) / passes, 2) if passes else None,
                    # The load generator's own CPU, in cores: it shares the machine.
                    "client_cpu_cores": round(client_cpu, 2),
                }
                r = rows[str(n)]
                print(
                    f"{mode:9s} {n:3d} clients: {r['rps']:7.1f} req/s  p50 {r['p50_ms']} ms  "
                    f"p99 {r['p99_ms']} ms  mean batch {r['mean_batch']}  "
                    f"non-200 {r['non_200']}",
                    flush=True,
                )
        finally:
            server.stop()
        lo, hi = str(min(clients)), str(max(clients))
        rows[f"ratio_{hi}_vs_{lo}_clients"] = round(rows[hi]["rps"] / rows[lo]["rps"], 2)
        out["modes"][mode] = rows
    out["bare_forward_batch16_img_per_s"] = round(
        bare_forward_img_per_s(source.store, source.ref), 1
    )
    hi = str(max(clients))
    out[f"batched_vs_unbatched_{hi}_clients"] = round(
        out["modes"]["batched"][hi]["rps"] / out["modes"]["unbatched"][hi]["rps"], 2
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per setting (a smoke run)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per setting")
    ap.add_argument("--warmup", type=float, default=2.0, help="untimed seconds per setting")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--store", type=Path, help="store with the trained demo (default ./store)")
    ap.add_argument(
        "--model",
        choices=("demo", "vgg19"),
        default="demo",
        help="the demo model, or a VGG-19 ProtoPNet at 224 px (random weights; where a GPU "
        "does the forward, the batcher has something to gain); writes "
        "service_throughput.json or service_throughput_vgg19.json",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    clients = sorted({int(c) for c in args.clients.split(",")})
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as d:
        result: dict[str, Any] = {"device": device_name()}
        result.update(measure(Path(d), clients, args.duration, args.warmup, args.store, args.model))
    hi, lo = max(clients), min(clients)
    print(
        f"{hi} vs {lo} clients: batched x{result['modes']['batched'][f'ratio_{hi}_vs_{lo}_clients']}"
        f", unbatched x{result['modes']['unbatched'][f'ratio_{hi}_vs_{lo}_clients']}; "
        f"batched vs unbatched at {hi} clients x{result[f'batched_vs_unbatched_{hi}_clients']}; "
        f"bare forward at batch 16: {result['bare_forward_batch16_img_per_s']} img/s"
    )
    write_result("service_throughput" + ("" if args.model == "demo" else "_vgg19"), result)
    return result


if __name__ == "__main__":
    main()
