"""examples/embed.html, a front-end team's starting point, in headless Chromium.

The page is served from its own origin by a plain static HTTP server, as a team's page
would be, and calls a real uvicorn API on another origin. With that origin allowed
(``PROTOPNET_CORS_ORIGINS``), an EXIF-rotated JPEG chosen in the file input is
explained: the heatmap lies over the photo, the box sits where the JSON puts it in the
photo the browser shows, and the sheet adds up. Without it, the page says what to set.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.service.corpus import exif_rotated
from tests.support.servers import REPO, ServerProcess, start_server

pytestmark = pytest.mark.slow


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """``examples/`` over HTTP on a port of its own: the front-end's origin."""
    handler = functools.partial(_QuietHandler, directory=str(REPO / "examples"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def cors_server(
    tmp_path_factory: pytest.TempPathFactory, store_root: Path, page_origin: str
) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("cors"), store_root, models="photo", cors_origins=page_origin
    )
    yield s
    s.stop()


def _open(browser, url: str):  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, wait_until="load")
    return page, errors


def test_embed_page_overlays_heatmap_and_box_from_another_origin(
    browser, cors_server, page_origin, photo_images, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # A camera JPEG stored sideways with EXIF orientation 6: the browser shows it upright.
    upload = tmp_path / "cat.jpg"
    upload.write_bytes(exif_rotated(photo_images["cat"], "JPEG", orientation=6))
    page, errors = _open(browser, f"{page_origin}/embed.html?api={cors_server.url}")
    with page.expect_response(lambda r: "/explain" in r.url) as answer:
        page.set_input_files("#file", str(upload))
    body = answer.value.json()
    page.wait_for_function(
        "() => { const h = document.getElementById('heat');"
        " return h.complete && h.naturalWidth > 0 && document.getElementById('box').style.width }"
    )
    assert errors == [] and page.locator("#error").inner_text() == ""
    assert body["prediction"]["label"] in page.locator("#answer").inner_text()

    photo = page.locator("#photo").bounding_box()
    heat = page.locator("#heat").bounding_box()
    box = page.locator("#box").bounding_box()
    assert photo and heat and box
    # The browser's upright photo is the service's oriented image (portrait here).
    natural = page.locator("#photo").evaluate("e => [e.naturalWidth, e.naturalHeight]")
    oriented = body["image"]["oriented"]
    assert natural == [oriented["width"], oriented["height"]] and natural[1] > natural[0]
    # The heatmap covers the photo exactly.
    for key in ("x", "y", "width", "height"):
        assert heat[key] == pytest.approx(photo[key], abs=1)
    # The box is the first shown row's, at the photo's scale.
    sheet = body["scoring_sheets"][0]
    shown = {p["prototype"]: p for p in body["prototypes"]}
    first = next(shown[r["prototype"]] for r in sheet["rows"] if r["prototype"] in shown)
    k = photo["width"] / oriented["width"]
    b = first["box"]
    assert box["x"] - photo["x"] == pytest.approx(b["x0"] * k, abs=1.5)
    assert box["y"] - photo["y"] == pytest.approx(b["y0"] * k, abs=1.5)
    assert box["width"] == pytest.approx((b["x1"] - b["x0"]) * k, abs=1.5)
    assert box["height"] == pytest.approx((b["y1"] - b["y0"]) * k, abs=1.5)
    # The sheet as shown adds up to the logit, and each row's patch image loaded.
    rows = page.locator("#sheet tbody tr")
    assert rows.count() == len(sheet["rows"])
    points = [float(rows.nth(i).locator("td").nth(4).inner_text()) for i in range(rows.count())]
    other = float(page.locator("#other").inner_text())
    assert sum(points) + other == pytest.approx(sheet["logit"], abs=5e-3 * (len(points) + 1))
    assert float(page.locator("#total").inner_text()) == pytest.approx(sheet["logit"], abs=1e-3)
    patches = page.locator("#sheet tbody img")
    assert patches.count() >= 1
    for i in range(patches.count()):
        assert patches.nth(i).evaluate("e => e.complete && e.naturalWidth > 0")
    # Clicking another row moves the highlight and the heatmap to that prototype.
    other_rows = [i for i, r in enumerate(sheet["rows"]) if r["prototype"] in shown][1:]
    if other_rows:
        i = other_rows[0]
        rows.nth(i).click()
        assert "chosen" in (rows.nth(i).get_attribute("class") or "")
        src = page.locator("#heat").get_attribute("src") or ""
        assert src.endswith(shown[sheet["rows"][i]["prototype"]]["heatmap"]["heatmap"])
    page.close()


def test_embed_page_says_what_to_set_when_cors_blocks_it(
    browser, server, page_origin, photo_images, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # The session's shared server allows no other origin.
    upload = tmp_path / "cat.png"
    photo_images["cat"].save(upload)
    page, errors = _open(browser, f"{page_origin}/embed.html?api={server.url}")
    page.set_input_files("#file", str(upload))
    page.wait_for_function("() => document.getElementById('error').textContent !== ''")
    message = page.locator("#error").inner_text()
    assert server.url in message and "PROTOPNET_CORS_ORIGINS" in message
    assert page_origin in message
    assert page.locator("#result").is_hidden()
    assert errors == []
    page.close()


def test_embed_page_shows_the_services_error(
    browser, cors_server, page_origin, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    upload = tmp_path / "notes.png"
    upload.write_bytes(b"this is not a picture at all")
    page, errors = _open(browser, f"{page_origin}/embed.html?api={cors_server.url}")
    page.set_input_files("#file", str(upload))
    page.wait_for_function("() => document.getElementById('error').textContent !== ''")
    message = page.locator("#error").inner_text()
    assert message.startswith("4") and "image" in message.lower(), message
    assert errors == []
    page.close()


def test_embed_page_shows_each_rows_receipt_when_asked(
    browser, cors_server, page_origin, photo_images, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    upload = tmp_path / "coffee.png"
    photo_images["coffee"].save(upload)
    page, errors = _open(browser, f"{page_origin}/embed.html?api={cors_server.url}")
    page.check("#check")
    with page.expect_response(lambda r: "/explain" in r.url) as answer:
        page.set_input_files("#file", str(upload))
    assert "faithfulness=true" in answer.value.url
    body = answer.value.json()
    page.wait_for_function("() => !document.getElementById('result').hidden")
    shown = {p["prototype"]: p for p in body["prototypes"]}
    rows = page.locator("#sheet tbody tr")
    for i, r in enumerate(body["scoring_sheets"][0]["rows"]):
        text = rows.nth(i).locator("td.receipt").inner_text()
        p = shown.get(r["prototype"])
        if p is None:
            assert text == ""
            continue
        rc = p["receipt"]
        word = "checked" if rc["verdict"] == "faithful" else "not confirmed"
        assert text.startswith(word)
        assert f"{round(100 * rc['deletion_ratio'])} % left" in text
    assert errors == []
    page.close()
