"""The model card through the real thing: a synthetic model trained and exported by the
command line (its nearest training patches drawn at export), revised once, served by a
real server and read in Chromium, reached from a report's link."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from model_store import ModelStore
from model_store.manifest import PrototypeQuality
from service.card import flags_of
from tests.service.helpers import post_image
from tests.support.servers import ServerProcess, start_server
from tests.training.conftest import run_cli
from training.export import NEAREST_K, NEAREST_TILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def card_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("card")
    store = base / "store"
    proc = run_cli(
        "train", "--config", "synthetic", "--run-dir", str(base / "run"),
        "--set", f"export.store={store}", "--export",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        "revise", "--model", "parts@1", "--remove", "1", "--reason", "a reviewer said so",
        "--store", str(store),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["published"] == "parts@2"
    return store


@pytest.fixture(scope="module")
def card_server(
    card_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    s = start_server(tmp_path_factory.mktemp("card-server"), card_store, default_model="parts")
    yield s
    s.stop()


def test_export_draws_each_prototypes_nearest_training_patches(card_store: Path) -> None:
    loaded = ModelStore(card_store).load("parts@1")
    q = loaded.manifest.interpretability
    assert q is not None
    for row in q.per_prototype:
        assert len(row.nearest_classes) == NEAREST_K
        own = sum(c == row.class_index for c in row.nearest_classes) / NEAREST_K
        assert row.nearest_own_share == pytest.approx(own)
        png = loaded.nearest_image_bytes(row.index)
        assert png is not None
        w, h = Image.open(io.BytesIO(png)).size
        assert (w, h) == (NEAREST_K * NEAREST_TILE + 2 * (NEAREST_K - 1), NEAREST_TILE)


def test_the_card_shows_the_model_its_quality_and_every_prototype(
    card_server: ServerProcess, card_store: Path, browser
) -> None:
    m = ModelStore(card_store).load("parts@2").manifest
    with httpx.Client(base_url=card_server.url, timeout=60) as client:
        r = client.get("/models/parts@2/card")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert client.get("/models/nope/card").status_code == 404
        body = post_image(client, _png(card_store), top_prototypes=3).json()
    page = browser.new_page()
    page.goto(card_server.url + "/models/parts@2/card", wait_until="load")
    assert "Model card: parts@2" in page.title()
    # The lineage: what it was revised from, what was removed, why.
    lineage = page.locator("#lineage").inner_text()
    assert "parts@1" in lineage and "prototypes 1 removed" in lineage
    assert "a reviewer said so" in lineage
    # Every prototype has its row under its class, with its pictures loaded.
    rows = page.locator("tr.prototype")
    assert rows.count() == len(m.prototypes) == 11
    for i in range(rows.count()):
        row = rows.nth(i)
        j = int(row.get_attribute("data-prototype"))
        imgs = row.locator("img")
        assert imgs.count() == 3, j  # patch, source, nearest strip
        assert all(imgs.nth(k).evaluate("e => e.complete && e.naturalWidth > 0") for k in range(3))
        q = next(p for p in m.interpretability.per_prototype if p.index == j)
        flags = row.locator(".flag").all_inner_texts()
        assert flags == flags_of(q, m.class_names), j
    assert page.locator("#q-unique").inner_text() == (
        f"{m.interpretability.unique_prototypes} of {m.interpretability.prototypes}"
    )
    # Every report links to its model's card.
    page.goto(card_server.url + body["links"]["report"], wait_until="load")
    page.locator("a.card-link").click()
    page.wait_for_load_state("load")
    assert page.title().startswith("Model card: parts@")
    page.close()


def _png(store: Path) -> bytes:
    """A training picture of the model, as an upload."""
    loaded = ModelStore(store).load("parts@1")
    src = loaded.prototype_image_bytes(0, "source")
    assert src is not None
    return src


def test_flags_say_what_is_weak() -> None:
    q = PrototypeQuality(
        index=3, class_index=0, duplicate_of=1, background=True, nearest_classes=[1, 1, 2, 0, 1],
        nearest_own_share=0.2, stability=0.3,
    )  # fmt: skip
    flags = flags_of(q, ["a", "b", "c"])
    assert flags[0].startswith("duplicate of prototype 1")
    assert flags[1].startswith("flat background")
    assert "80% of its nearest training patches are of other classes (b, c)" in flags[2]
    assert "changes on 70%" in flags[3]
    assert flags_of(PrototypeQuality(index=0, class_index=0), ["a"]) == []
