"""The report shows the published prototype-quality figures: a caution on each row whose
prototype is flat background or a duplicate, and the model's figures in the footer
(a real server and Chromium)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model_store import ModelStore
from model_store.manifest import Interpretability, PrototypeQuality
from tests.service.corpus import encode
from tests.service.helpers import post_image
from tests.service.store_builder import build_photo_model
from tests.support.servers import ServerProcess, start_server

BACKGROUND = {0, 3, 6, 7}


def _quality() -> Interpretability:
    rows = [
        PrototypeQuality(
            index=j, class_index=j // 3, background=j in BACKGROUND, patch_std=0.01,
            duplicate_of=4 if j == 5 else None, images=10, stability=0.9,
        )
        for j in range(9)
    ]  # fmt: skip
    return Interpretability(
        prototypes=9, unique_prototypes=8, duplicates=1, background_prototypes=len(BACKGROUND),
        sparsity=0.62, stability=0.9, consistency=None, measured_on="test split, 30 images",
        images=30, per_prototype=rows,
    )  # fmt: skip


@pytest.fixture(scope="module")
def quality_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quality-store")
    build_photo_model(ModelStore(root), interpretability=_quality())
    return root


@pytest.fixture(scope="module")
def quality_server(
    quality_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("quality-server"), quality_store, default_model="photo"
    )
    yield s
    s.stop()


def test_report_flags_weak_prototypes_and_states_the_figures(
    quality_server: ServerProcess, browser, photo_images
) -> None:
    with httpx.Client(base_url=quality_server.url, timeout=60) as client:
        info = client.get("/models/photo").json()
        assert info["interpretability"]["background_prototypes"] == len(BACKGROUND)
        body = post_image(client, encode(photo_images["coffee"], "PNG"), top_prototypes=9).json()
    page = browser.new_page()
    page.goto(quality_server.url + body["links"]["report"], wait_until="load")
    rows = page.locator("tr.row")
    seen = set()
    for i in range(rows.count()):
        row = rows.nth(i)
        j = int(row.locator("td").nth(2).locator(".note").first.inner_text().split()[-1])
        flags = " ".join(row.locator(".quality-flag").all_inner_texts())
        assert ("flat background" in flags) == (j in BACKGROUND), (j, flags)
        assert ("duplicate of prototype 4" in flags) == (j == 5), (j, flags)
        seen.add(j)
    assert seen & BACKGROUND and seen - BACKGROUND  # both kinds of row were shown
    footer = page.locator("footer .quality").inner_text()
    assert "8 of 9 are distinct training patches" in footer
    assert "4 are flat background" in footer and "on 90% of images" in footer
    assert "62% of the last layer's weight" in footer
    page.close()


def test_alias_history_over_http(quality_server: ServerProcess, quality_store: Path) -> None:
    """What the promotion gate recorded, as a front end reads it."""
    store = ModelStore(quality_store)
    store.promote("photo", "1", "reviewed", forced=True, failed=["stability"])
    with httpx.Client(base_url=quality_server.url, timeout=60) as client:
        r = client.get("/models/photo/history")
        assert r.status_code == 200
        moves = r.json()
        assert client.get("/models/nope/history").status_code == 404
    assert moves == store.alias_history("photo")
    assert moves[0]["alias"] == "latest" and moves[0]["version"] == "1"  # the publish
    assert moves[-1] | {"at": None, "by": None} == {
        "alias": "reviewed", "version": "1", "previous": None, "at": None, "by": None,
        "forced": True, "failed": ["stability"],
    }  # fmt: skip
