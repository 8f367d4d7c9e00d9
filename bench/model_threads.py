"""Two models loaded on one CPU: what the idle one's threads cost the busy one's forward.

    python -m bench.model_threads [--repeats 30] [--rounds 3] [--backbone resnet50]

Two random-weight ProtoPNets (ResNet-50 trunk at 224 px by default, 200 classes x 10
prototypes) are published to a scratch store and loaded by the service's own registry
(``create_app``'s lifespan) with ``PROTOPNET_TORCH_THREADS`` unset, so each times its
forward at warm-up and wants every core if they pay. One of them holds the cores; the
other runs on one thread without an OpenMP team (``protopnet.threads.CoreBudget``).

The holder's bare forward, batch 1, on its own thread, is timed in two states,
alternating for ``--rounds`` rounds so the machine's drift affects both alike:

- ``shared``: this version; the other model's thread has no team.
- ``second_team``: the other model's thread also holds a team of one thread per core,
  idle, as the previous version's warm-up left it on every model thread (it timed the
  forward with all cores on the model thread itself). libgomp then throttles both.

Reported: p50s in ms and ``second_team_over_shared``. Results:
bench/results/model_threads.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import device_name, p50, write_result
from model_store import ModelStore
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.threads import DEFAULT_TORCH_THREADS, use_torch_threads
from service.main import create_app
from service.registry import ServedModel
from service.settings import Settings
from tests.support.serving import publish_random


async def _forwards(model: ServedModel, x: torch.Tensor, repeats: int) -> list[float]:
    def one() -> float:
        t = time.perf_counter()
        model._run_batch(x)
        return time.perf_counter() - t

    await model.batcher.on_thread(one)  # warm
    return [await model.batcher.on_thread(one) for _ in range(repeats)]


async def _thread_gone(before: set[int]) -> None:
    for _ in range(200):
        if not before & {t.ident for t in threading.enumerate()}:
            return
        await asyncio.sleep(0.01)


async def _measure(store: Path, refs: list[str], repeats: int, rounds: int) -> dict[str, Any]:
    settings = Settings(
        store=store, default_model=refs[0], models=[], redis_url=None, log_level="warning"
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        reg = app.state.registry
        models = [await reg.get(ref) for ref in refs]
        # The one loaded last took the cores for its trial and, wanting them, kept them.
        holder, other = sorted(models, key=lambda m: -m.torch_threads)
        S = holder.preprocessing.img_size
        x = torch.zeros(1, 3, S, S)
        out: dict[str, Any] = {
            "threads": {m.name: m.torch_threads for m in models},
            "wanted": {m.name: m.wanted_threads for m in models},
            "timed": holder.name,
        }
        times: dict[str, list[float]] = {"shared": [], "second_team": []}
        n = DEFAULT_TORCH_THREADS
        for _ in range(rounds):
            times["shared"] += await _forwards(holder, x, repeats)

            def team() -> int:  # what the previous version's warm-up left behind
                use_torch_threads(n)
                other._run_batch(x)
                use_torch_threads(1)
                return threading.get_ident()

            ident = await other.batcher.on_thread(team)
            times["second_team"] += await _forwards(holder, x, repeats)
            other._use_threads(1)  # a new thread: the old one and its team end
            await _thread_gone({ident})
        for k, v in times.items():
            out[f"{k}_ms_p50"] = round(p50(v) * 1e3, 2)
        out["second_team_over_shared"] = round(p50(times["second_team"]) / p50(times["shared"]), 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--quick", action="store_true", help="10 repeats, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.rounds = 10, 2
    arch = ProtoPNetConfig(
        backbone=args.backbone,
        num_classes=200,
        prototypes_per_class=10,
        prototype_depth=128,
        add_on="regular",
        img_size=224,
    )
    classes = [f"class_{k:03d}" for k in range(200)]
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "store")
        refs = [
            publish_random(store, name, arch, Preprocessing(img_size=224), classes, seed=s)
            for s, name in enumerate(["first", "second"])
        ]
        res = asyncio.run(_measure(store.root, refs, args.repeats, args.rounds))
    res.update(
        {
            "device": device_name(torch.device("cpu")),
            "backbone": args.backbone,
            "img_size": 224,
            "repeats": args.repeats,
            "rounds": args.rounds,
        }
    )
    print(
        f"{args.backbone} 224 px on {res['device']}: threads {res['threads']}; the forward "
        f"of the one with the cores, the other loaded beside it: {res['shared_ms_p50']} ms; "
        f"with the other's idle team as the previous version left it: "
        f"{res['second_team_ms_p50']} ms -> x{res['second_team_over_shared']}",
        flush=True,
    )
    write_result("model_threads", res)
    return res


if __name__ == "__main__":
    main()
