"""How long each step of an explanation holds the GIL: the steps that would serialise
the service's threads on a machine with many cores.

    python -m bench.gil [--quick] [--seconds 2] [--rounds 3] [--no-vgg]

On a many-core GPU machine an /explain request's CPU work runs on several threads at
once (the worker pool, the model thread, the event loop), so its throughput is bounded
by the part of that work that holds the GIL, not by its wall time. This measures that
part on any machine with two free cores: a probe thread runs a pure-Python loop, and a
worker thread runs one step of the service over and over (``decode``, the ``forward``
with its similarity maps, the post-forward work ``finish`` and its parts). Whatever the
worker holds the GIL for, the probe cannot run, so

    GIL ms per call = (1 - probe rate beside the step / probe rate alone) x seconds / calls

``wall_ms`` is the step's own time per call, run alone. Each round times the probe
alone, the step alone and the two together, so the machine's drift affects them alike;
medians over the rounds are reported. The steps are the service's own objects (the app
from ``service.main.create_app``, its model and explanation service), fed real request
images (new bytes each call); the worker runs torch with one thread, so the probe keeps
a core of its own. Results: bench/results/gil.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import torch

from bench.common import device_name, p50, write_result
from protokit.threads import use_torch_threads
from service import render
from service.explanations import build_explanation, familiarity_answer, image_info
from service.images import decode_image
from service.registry import ForwardResult, ModelInput, forward_batch
from tests.support.serving import (
    ModelSource,
    RequestImages,
    add_model_args,
    in_process,
    model_cases,
)

SWITCH_INTERVAL_S = 2e-4  # short, so a step waiting for the GIL gets it back soon


def _probe(stop: threading.Event, counts: list[int]) -> None:
    n = 0
    while not stop.is_set():
        for _ in range(200):
            pass
        n += 1
    counts.append(n)


def _repeat(fn: Callable[[], Any], stop: threading.Event, counts: list[int]) -> None:
    use_torch_threads(1)
    n = 0
    with torch.inference_mode():
        while not stop.is_set():
            fn()
            n += 1
    counts.append(n)


def _run(seconds: float, probe: bool, step: Callable[[], Any] | None) -> tuple[float, int]:
    """(probe loops per second or 0, calls of ``step``) over ``seconds``."""
    stop = threading.Event()
    probes: list[int] = []
    calls: list[int] = []
    threads = []
    if probe:
        threads.append(threading.Thread(target=_probe, args=(stop, probes)))
    if step is not None:
        threads.append(threading.Thread(target=_repeat, args=(step, stop, calls)))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    return (probes[0] / dt if probes else 0.0), (calls[0] if calls else 0)


def _python_loop() -> None:
    for _ in range(20000):
        pass


CALIBRATION: dict[str, Callable[[], Any]] = {
    # The method's two ends: a step that never holds the GIL reads near 0 %, one that
    # always does near 100 %.
    "sleep 1 ms": lambda: time.sleep(0.001),
    "python loop": _python_loop,
}


def measure_steps(
    steps: dict[str, Callable[[], Any]], seconds: float, rounds: int
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, step in steps.items():
        for _ in range(3):  # warm
            with torch.inference_mode():
                step()
        alone_rate, gil_ms, wall_ms = [], [], []
        for _ in range(rounds):
            rate, _ = _run(seconds, True, None)
            _, calls_alone = _run(seconds, False, step)
            rate_with, calls_with = _run(seconds, True, step)
            alone_rate.append(rate)
            wall_ms.append(seconds / max(calls_alone, 1) * 1000)
            lost = max(0.0, 1 - rate_with / rate)
            gil_ms.append(lost * seconds / max(calls_with, 1) * 1000)
        w, g = p50(wall_ms), p50(gil_ms)
        out[name] = {"wall_ms": round(w, 3), "gil_ms": round(g, 3), "gil_share": round(g / w, 2)}
        print(f"  {name:16s} {w:8.3f} ms a call, GIL held {g:8.3f} ms ({g / w:4.0%})", flush=True)
    return out


async def _steps(source: ModelSource, seconds: float, rounds: int) -> dict[str, Any]:
    async with in_process(source) as service:
        settings, svc, served = service.settings, service.explanations, service.served
        images = RequestImages(served.preprocessing)
        prep, s = served.preprocessing, settings
        uploads = [images(i) for i in range(64)]
        decoded = [decode_image(u, prep, s.max_image_pixels, s.max_map_side) for u in uploads]
        requests = [ModelInput(d.tensor, d.size, 3, 10) for d in decoded]

        def run(r: ModelInput) -> list[ForwardResult]:
            return forward_batch(served.model, served.explainer, None, served.runtime, [r])

        fwds = [run(r)[0] for r in requests[:16]]
        images_and_fwds = list(zip(decoded[:16], fwds, strict=True))
        pairs = itertools.cycle(images_and_fwds)
        ups = itertools.cycle(uploads)
        inputs = itertools.cycle(requests)

        def explain_maps(d: Any, f: Any) -> Any:
            return served.explanation(f, ModelInput(d.tensor, d.size, 3, 10))

        exps = itertools.cycle([(d, explain_maps(d, f)) for d, f in images_and_fwds])

        def finish() -> None:
            d, f = next(pairs)
            svc._finish(served, d, "0" * 64, "0" * 32, ModelInput(d.tensor, d.size, 3, 10), f)

        def json_step() -> None:
            d, e = next(exps)
            fam = familiarity_answer(served, None, 1.0)
            orjson.dumps(build_explanation(e, served, image_info(d, "0" * 64), "0" * 32, fam))

        def pack() -> None:
            d, e = next(exps)
            render.pack_render(e, prep, d.display)

        steps: dict[str, Callable[[], Any]] = {
            "decode": lambda: decode_image(next(ups), prep, s.max_image_pixels, s.max_map_side),
            "forward": lambda: run(next(inputs)),
            "finish": finish,
            "finish.maps": lambda: explain_maps(*next(pairs)),
            "finish.json": json_step,
            "finish.render": pack,
        }
        return {
            "model": source.ref,
            "image_size": prep.img_size,
            "prototypes": served.model.num_prototypes,
            "steps": measure_steps(steps, seconds, rounds),
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short slices, one round")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each time slice")
    ap.add_argument("--rounds", type=int, default=3)
    add_model_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 0.5, 1
    use_torch_threads(1)
    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    results: dict[str, Any] = {"device": device_name(), "models": {}}
    try:
        print("calibration", flush=True)
        results["calibration"] = measure_steps(CALIBRATION, args.seconds, args.rounds)
        with tempfile.TemporaryDirectory(prefix="bench-gil-") as d:
            for key, make in model_cases(Path(d), args):
                print(key, flush=True)
                results["models"][key] = asyncio.run(_steps(make(), args.seconds, args.rounds))
    finally:
        sys.setswitchinterval(old)
    write_result("gil", results)
    return results


if __name__ == "__main__":
    main()
