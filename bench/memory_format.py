"""The service's forward in the two memory layouts: row-major NCHW (the layout the
weights are saved in) against channels-last (NHWC), which ``PROTOPNET_CHANNELS_LAST``
(on by default) picks.

    python -m bench.memory_format [--quick] [--repeats 20] [--device auto]

For the demo's architecture (28 px) and a CUB-scale VGG-19 ProtoPNet (224 px), both
with random weights, one model per layout holds the same weights. The service's forward
(``forward_full`` plus the similarity maps, in inference mode) is timed at batch 1 and
at the service's largest batch (16), the two layouts alternating call by call so the
machine's drift affects them alike. On a CPU each model runs with the torch threads the
service gives it (the demo one, VGG-19 every core; ``service.registry``). The largest
difference between the two layouts' logits is reported too: the layout changes the
order of the sums, not the result. Results: bench/results/memory_format.json.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.common import device_name, p50, seconds_of, write_result
from protokit.devices import pick_device
from protokit.threads import DEFAULT_TORCH_THREADS, on_scratch_thread, use_torch_threads
from protopnet.config import ProtoPNetConfig
from protopnet.model import ProtoPNet, create_model
from tests.support.serving import cub_vgg19_config, demo_architecture

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _models(arch: ProtoPNetConfig, device: torch.device) -> dict[str, ProtoPNet]:
    torch.manual_seed(0)
    base = create_model(arch).eval()
    out = {}
    for name, fmt in LAYOUTS.items():
        m = create_model(arch).eval()
        m.load_state_dict(base.state_dict())
        out[name] = m.to(device).to(memory_format=fmt)
    return out


def measure(
    arch: ProtoPNetConfig, batches: list[int], repeats: int, device: torch.device
) -> dict[str, Any]:
    models = _models(arch, device)
    S = arch.img_size
    out: dict[str, Any] = {"image_size": S, "prototypes": arch.num_prototypes}
    with torch.inference_mode():
        for B in batches:
            x = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(B)).to(device)
            inputs = {k: x.contiguous(memory_format=f) for k, f in LAYOUTS.items()}

            def forward(name: str, inputs: dict[str, torch.Tensor] = inputs) -> Any:
                o = models[name].forward_full(inputs[name])
                return o.logits, models[name].similarity(o.distances)

            logits = {k: forward(k)[0].float().cpu() for k in LAYOUTS}  # also the warm-up
            times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
            for _ in range(repeats + 1):
                for k in LAYOUTS:
                    times[k].append(seconds_of(lambda k=k: forward(k), device))
            row = {f"{k}_ms_p50": round(p50(v[1:]) * 1000, 3) for k, v in times.items()}
            row["speedup"] = round(
                p50(times["contiguous"][1:]) / p50(times["channels_last"][1:]), 3
            )
            row["max_logit_diff"] = float(
                (logits["contiguous"] - logits["channels_last"]).abs().max()
            )
            out[f"batch_{B}"] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per layout and batch")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    repeats = 3 if args.quick else args.repeats
    demo_arch, _, _ = demo_architecture()
    # (architecture, torch threads on a CPU as the service picks them, repeats factor)
    cases = {
        "demo": (demo_arch, 1, 10),
        "vgg19_224": (cub_vgg19_config(), DEFAULT_TORCH_THREADS, 1),
    }
    results: dict[str, Any] = {"device": device_name(device), "models": {}}
    for key, (arch, threads, factor) in cases.items():

        def run(arch: ProtoPNetConfig = arch, threads: int = threads, n: int = factor) -> Any:
            use_torch_threads(threads)
            return measure(arch, [1, 16], repeats * n, device)

        # Each case on a thread of its own: its OpenMP team ends with it.
        r = on_scratch_thread(run)
        r["torch_threads"] = threads if device.type == "cpu" else None
        results["models"][key] = r
        for b in (1, 16):
            row = r[f"batch_{b}"]
            print(
                f"{key:10s} batch {b:2d}: contiguous {row['contiguous_ms_p50']:9.2f} ms | "
                f"channels-last {row['channels_last_ms_p50']:9.2f} ms (x{row['speedup']:.2f} "
                f"faster) | logits differ by {row['max_logit_diff']:.1e}"
            )
    write_result("memory_format", results)
    return results


if __name__ == "__main__":
    main()
