"""What the faithfulness receipt and the map methods cost: ``/explain`` with
``faithfulness=true``, with ``method=smoothgrad`` and with ``method=prp``, against the
plain ``/explain`` and a bare forward, in process, the service's own objects.

    python -m bench.receipts [--repeats-demo 20] [--repeats-vgg 2] [--no-vgg]

The receipt blanks each shown box and 4 random boxes of its size and runs the model on
every copy (about 35 boxes x 5 copies = 175 images for 3 classes x 10 prototypes), so
its cost is that many forwards at the largest batch the model thread runs. SmoothGrad
runs 16 forward and backward passes per shown prototype, PRP one. Alternating, new
image every time (no cache hit); p50s and ratios to the bare forward (``cost_ratio``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import device_name, p50, seconds_of, write_result
from protokit.threads import use_torch_threads
from service.images import decode_image
from tests.support.serving import (
    ModelSource,
    RequestImages,
    add_model_args,
    in_process,
    model_cases,
)


async def _measure(source: ModelSource, repeats: int) -> dict[str, Any]:
    async with in_process(source) as service:
        settings, svc, served = service.settings, service.explanations, service.served
        images = RequestImages(served.preprocessing)
        rt = served.runtime
        decoded = decode_image(
            images(0), served.preprocessing, settings.max_image_pixels, settings.max_map_side
        )
        x = decoded.tensor[None].to(rt.device, memory_format=rt.memory_format)

        def forward() -> float:
            def run() -> None:
                with torch.inference_mode():
                    served.model(x)

            return seconds_of(run, x.device)

        variants = (
            ("explain", False, "upsample"),
            ("explain_receipts", True, "upsample"),
            ("explain_smoothgrad", False, "smoothgrad"),
            ("explain_prp", False, "prp"),
        )
        times: dict[str, list[float]] = {"forward": []} | {v[0]: [] for v in variants}
        shown = 0
        step = len(variants)
        for i in range(1, step * (repeats + 1), step):
            times["forward"].append(await served.batcher.on_thread(forward))
            for n, (key, check, method) in enumerate(variants):
                upload = images(i + n)
                t0 = time.perf_counter()
                body, hit = await svc.explain(served, upload, 3, 10, check, method)
                times[key].append(time.perf_counter() - t0)
                assert not hit
                if check:
                    shown = body.count(b'"verdict"')
        fwd = p50(times["forward"][1:])
        out: dict[str, Any] = {"model": source.ref, "repeats": repeats, "rows_checked": shown}
        for key, ts in times.items():
            out[f"{key}_ms_p50"] = round(p50(ts[1:]) * 1000, 2)
            out[f"{key}_ratio"] = round(p50(ts[1:]) / fwd, 2)
        out["cost_ratio"] = {k: out[f"{k}_ratio"] for k in times}
        out["receipts_over_explain"] = round(
            p50(times["explain_receipts"][1:]) / p50(times["explain"][1:]), 2
        )
        return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats-demo", type=int, default=20)
    ap.add_argument("--repeats-vgg", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 demo repeats, 1 VGG-19")
    add_model_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats_demo, args.repeats_vgg = 3, 1
    use_torch_threads(1)  # this thread stands in for the event loop
    result: dict[str, Any] = {"device": device_name(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-receipts-") as d:
        repeats = {"demo": args.repeats_demo, "vgg19_224": args.repeats_vgg}
        for key, make in model_cases(Path(d), args):
            r = asyncio.run(_measure(make(), repeats[key]))
            result["models"][key] = r
            print(
                f"{key:10s} forward {r['forward_ms_p50']:9.2f} ms | explain "
                f"{r['explain_ms_p50']:9.2f} ms (x{r['explain_ratio']}) | with receipts "
                f"{r['explain_receipts_ms_p50']:9.2f} ms (x{r['explain_receipts_ratio']}, "
                f"x{r['receipts_over_explain']} the plain explain; {r['rows_checked']} rows) | "
                f"smoothgrad {r['explain_smoothgrad_ms_p50']:9.2f} ms "
                f"(x{r['explain_smoothgrad_ratio']}) | prp {r['explain_prp_ms_p50']:9.2f} ms "
                f"(x{r['explain_prp_ratio']})",
                flush=True,
            )
    write_result("receipts", result)
    return result


if __name__ == "__main__":
    main()
