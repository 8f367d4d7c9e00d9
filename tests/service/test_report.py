"""The report page in headless Chromium: the paper's rows (this part of the image, where
it is, the prototype, the training image it comes from, similarity x weight = points)
render, nothing external is fetched, no console errors, and it prints."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from model_store.manifest import ClassMetrics, Metrics
from service.report import class_record
from tests.service.corpus import encode
from tests.service.helpers import png_of

pytestmark = pytest.mark.slow


def _inline(uri: str) -> np.ndarray:
    """An inline data: URI's picture as an RGB array."""
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    return np.asarray(img.convert("RGB"))


def _served(client, url: str, like: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A PNG the API serves, as RGB at ``like``'s size (the report shrinks its pictures)."""
    rgb = np.asarray(png_of(client, url).convert("RGB"))
    return cv2.resize(rgb, (like.shape[1], like.shape[0]), interpolation=cv2.INTER_AREA)


def test_report_renders_rows_and_images(client, server, browser, photo_images) -> None:
    data = encode(photo_images["cat"].rotate(5), "PNG")
    body = client.post("/explain", content=data, headers={"Content-Type": "image/png"}).json()
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url))
    resp = page.goto(server.url + body["links"]["report"], wait_until="load")
    assert resp is not None and resp.status == 200
    # The page needs nothing but its inline style and data: pictures, and says so; the
    # browser enforces that below (a blocked resource is a console error).
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    pred, runner = body["scoring_sheets"][0], body["scoring_sheets"][1]
    assert pred["label"] in page.title()
    # How often the model's answer was right on its test set, as the store published it.
    tested = page.locator("p.tested").inner_text()
    ref = f"{body['model']['name']}@{body['model']['version']}"
    metrics = client.get(f"/models/{ref}").json()["metrics"]
    figures = metrics["test_per_class"][pred["class_index"]]
    assert figures["label"] == pred["label"]
    assert f"answered {pred['label']} for {figures['recall'] * 100:.1f}% of the" in tested
    assert f"the {figures['images']} {pred['label']} images (sensitivity)" in tested
    assert f'{figures["precision"] * 100:.1f}% of its "{pred["label"]}" answers' in tested
    assert f"right for {metrics['test_accuracy'] * 100:.1f}% of test images" in tested
    sections = page.locator("section.class")
    assert sections.count() == 2
    for i, sheet in enumerate((pred, runner)):
        sec = sections.nth(i)
        assert sheet["label"] in sec.locator("h2").inner_text()
        rows = sec.locator("tr.row")
        assert rows.count() == len(sheet["rows"])  # 3 per class, under the 10-row cap
        activations = []
        for r, row in enumerate(sheet["rows"]):
            cells = rows.nth(r).locator("td")
            assert cells.count() == 8
            badge = cells.nth(7).locator(".badge").inner_text()  # checked for the page
            assert badge in ("box checked", "box not confirmed")
            assert f"prototype {row['prototype']}" in cells.nth(2).inner_text()
            assert cells.nth(6).inner_text() == f"{row['points']:+.3f}"
            # "Where it is": the API's overlay heatmap of that prototype (box drawn on it).
            act = _inline(cells.nth(1).locator("img").get_attribute("src"))
            url = f"/explanations/{body['id']}/heatmaps/{row['prototype']}.png?style=overlay"
            assert np.abs(act.astype(int) - _served(client, url, act).astype(int)).mean() < 8
            activations.append(act)
            # "From this training image": the store's source picture of that prototype.
            src = _inline(cells.nth(3).locator("img").get_attribute("src"))
            ref = f"{body['model']['name']}@{body['model']['version']}"
            url = f"/models/{ref}/prototypes/{row['prototype']}.png?kind=source"
            assert np.abs(src.astype(int) - _served(client, url, src).astype(int)).mean() < 6
        # Each row's map is its own prototype's.
        assert all(
            np.abs(a.astype(int) - activations[0].astype(int)).mean() > 1 for a in activations[1:]
        )
        total = sec.locator("tr.total td").nth(1).inner_text()
        assert total == f"{sheet['total']:+.3f}" == f"{sheet['logit']:+.3f}"
    # Every image is inline and decoded by the browser.
    images = page.locator("img")
    assert images.count() == 1 + 4 * (len(pred["rows"]) + len(runner["rows"]))
    for k in range(images.count()):
        img = images.nth(k)
        assert img.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert img.evaluate("e => e.complete && e.naturalWidth > 0")
    # One request, the page itself: images are data: URIs, no favicon, nothing external.
    assert errors == []
    assert [u for u in fetched if not u.startswith("data:")] == [
        server.url + body["links"]["report"]
    ]
    pdf = page.pdf(format="A4")
    assert pdf.startswith(b"%PDF")
    page.close()
    html = client.get(body["links"]["report"]).text
    assert "http://" not in html and "https://" not in html  # no external resources at all


def test_the_report_gives_each_checked_row_its_badge(client, server, browser, photo_images) -> None:
    """With faithfulness=true, each row's last cell holds a badge for its verdict and
    the two percentages in words; a doubtful row also says not to rely on the box."""
    buf = io.BytesIO()
    photo_images["cat"].save(buf, format="PNG")
    r = client.post(
        "/explain?faithfulness=true", content=buf.getvalue(), headers={"Content-Type": "image/png"}
    )
    body = r.json()
    receipt_of = {p["prototype"]: p["receipt"] for p in body["prototypes"]}
    page = browser.new_page()
    page.goto(server.url + body["links"]["report"], wait_until="load")
    rows = page.locator("section.class").nth(0).locator("tr.row")
    for i, row in enumerate(body["scoring_sheets"][0]["rows"]):
        cell = rows.nth(i).locator("td.receipt")
        rc = receipt_of.get(row["prototype"])
        if rc is None:  # a row whose prototype has no map: not checked
            continue
        badge = cell.locator(".badge")
        assert badge.get_attribute("class") == f"badge {rc['verdict']}"
        assert badge.inner_text() == (
            "box checked" if rc["verdict"] == "faithful" else "box not confirmed"
        )
        text = cell.inner_text()
        assert f"Hiding the box leaves {rc['deletion_ratio'] * 100:.0f}% of the match" in text
        assert f"elsewhere leaves {rc['random_deletion_ratio'] * 100:.0f}%" in text
        assert ("do not rely on where it points" in text) == (rc["verdict"] == "doubtful")
    page.close()


def test_the_test_set_line_needs_per_class_figures() -> None:
    """Published without per-class figures (older versions), or for a class without a
    test image, the page says nothing rather than something made up."""
    assert class_record(None, 0) is None
    assert class_record(Metrics(test_accuracy=0.9), 0) is None
    per_class = [
        ClassMetrics(label="a", images=5, recall=0.8, precision=None),
        ClassMetrics(label="b", images=0),
    ]
    m = Metrics(test_accuracy=0.5, test_per_class=per_class)
    assert class_record(m, 0) == per_class[0]
    assert class_record(m, 1) is None
    assert class_record(m, 7) is None
