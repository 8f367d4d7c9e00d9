"""Three service replicas, one Redis and Debian's nginx in front, on loopback, under
closed-loop load: a replica SIGKILLed mid-load, then a rolling restart (SIGTERM each in
turn, start it again on its port). What the scenarios record, the test checks and
bench/replicas.py reports."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support.proxy import NginxProcess, start_nginx
from tests.support.servers import RedisProcess, ServerProcess, free_port, launch_server
from tests.support.serving import RequestImages


@dataclass
class Record:
    start: float
    ms: float
    status: int | None
    eid: str | None = None
    error: str | None = None  # the client's exception when no response came back


@dataclass
class Load:
    records: list[Record] = field(default_factory=list)

    def p99(self, t0: float, t1: float) -> float | None:
        ms = [r.ms for r in self.records if t0 <= r.start < t1 and r.status == 200]
        return round(float(np.percentile(ms, 99)), 1) if ms else None

    def failed(self) -> list[Record]:
        return [r for r in self.records if r.status != 200]


async def _load(
    url: str, images: RequestImages, clients: int, stop: asyncio.Event, out: Load
) -> None:
    counter = iter(range(10**9))
    headers = {"Content-Type": images.content_type}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client() -> None:
            while not stop.is_set():
                body = images(next(counter))
                t = time.monotonic()
                try:
                    r = await http.post("/explain", content=body, headers=headers)
                    eid = r.json().get("id") if r.status_code == 200 else None
                    out.records.append(Record(t, (time.monotonic() - t) * 1000, r.status_code, eid))
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"[:200]
                    out.records.append(Record(t, (time.monotonic() - t) * 1000, None, None, error))

        await asyncio.gather(*(client() for _ in range(clients)))


class Cluster:
    """Redis, ``n`` replicas on fixed ports, nginx over them."""

    def __init__(self, tmp: Path, store: Path, n: int = 3, **settings: Any):
        self.tmp, self.store, self.settings = tmp, store, settings
        self.redis = RedisProcess(free_port())
        self.redis.start()
        self.ports = [free_port() for _ in range(n)]
        self.replicas: list[ServerProcess] = [self._start(p) for p in self.ports]
        for r in self.replicas:
            r.wait("/readyz", timeout=180)
        self.proxy: NginxProcess = start_nginx(tmp, [f"127.0.0.1:{p}" for p in self.ports])

    def _start(self, port: int) -> ServerProcess:
        return launch_server(
            self.tmp, self.store, port=port, redis_url=self.redis.url, **self.settings
        )

    def restart(self, i: int) -> None:
        """Replica i started again on its port (after it stopped), ready."""
        self.replicas[i] = self._start(self.ports[i])
        self.replicas[i].wait("/readyz", timeout=180)

    def close(self) -> None:
        self.proxy.stop()
        for r in self.replicas:
            r.stop()
        self.redis.stop()


async def _scenario(
    cluster: Cluster, images: RequestImages, clients: int, phase_s: float, action: Any
) -> dict[str, Any]:
    load, stop = Load(), asyncio.Event()
    task = asyncio.create_task(_load(cluster.proxy.url, images, clients, stop, load))
    t0 = time.monotonic()
    await asyncio.sleep(phase_s)  # before
    t1 = time.monotonic()
    await asyncio.to_thread(action)  # during
    t2 = time.monotonic()
    await asyncio.sleep(phase_s)  # after
    stop.set()
    await task
    t3 = time.monotonic()
    # Every id handed out stays readable through the proxy, from whichever replica.
    ids = {r.eid for r in load.records if r.eid}
    async with httpx.AsyncClient(base_url=cluster.proxy.url, timeout=60) as http:
        unreadable = 0
        for eid in ids:
            if (await http.get(f"/explanations/{eid}")).status_code != 200:
                unreadable += 1
    failed = load.failed()
    return {
        "requests": len(load.records),
        "failed": len(failed),
        "failed_statuses": sorted({str(r.status) for r in failed}),
        "client_errors": sorted({r.error for r in failed if r.error is not None}),
        "p99_ms_before": load.p99(t0, t1),
        "p99_ms_during": load.p99(t1, t2),
        "p99_ms_after": load.p99(t2, t3),
        "during_s": round(t2 - t1, 1),
        "ids": len(ids),
        "ids_unreadable": unreadable,
    }


def run_scenarios(
    tmp: Path,
    store: Path,
    images: RequestImages,
    clients: int = 16,
    phase_s: float = 5.0,
    **settings: Any,
) -> dict[str, Any]:
    """``kill``: SIGKILL replica 0 mid-load (and start it again afterwards, outside the
    figures); ``rolling``: SIGTERM each replica in turn and start it again, under load."""
    cluster = Cluster(tmp, store, **settings)
    try:

        def kill() -> None:
            cluster.replicas[0].proc.kill()
            cluster.replicas[0].proc.wait(10)
            time.sleep(phase_s)  # the load goes on with two replicas

        def rolling() -> None:
            for i in range(len(cluster.replicas)):
                cluster.replicas[i].stop()
                cluster.restart(i)

        out = {"kill": asyncio.run(_scenario(cluster, images, clients, phase_s, kill))}
        cluster.restart(0)
        out["rolling"] = asyncio.run(_scenario(cluster, images, clients, phase_s, rolling))
        return out
    finally:
        cluster.close()
