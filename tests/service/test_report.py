"""The report page in headless Chromium: rows and images render, nothing external is
fetched, no console errors, and it prints."""

from __future__ import annotations

import pytest

from tests.service.corpus import encode

pytestmark = pytest.mark.slow


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
    pred, runner = body["scoring_sheets"][0], body["scoring_sheets"][1]
    assert pred["label"] in page.title()
    sections = page.locator("section.class")
    assert sections.count() == 2
    for i, sheet in enumerate((pred, runner)):
        sec = sections.nth(i)
        assert sheet["label"] in sec.locator("h2").inner_text()
        rows = sec.locator("tr.row")
        assert rows.count() == len(sheet["rows"])  # 3 per class, under the 10-row cap
        for r, row in enumerate(sheet["rows"]):
            cells = rows.nth(r).locator("td")
            assert f"prototype {row['prototype']}" in cells.nth(1).inner_text()
            assert cells.nth(4).inner_text() == f"{row['points']:+.3f}"
        total = sec.locator("tr.total td").nth(1).inner_text()
        assert total == f"{sheet['total']:+.3f}" == f"{sheet['logit']:+.3f}"
    # Every image is inline and decoded by the browser.
    images = page.locator("img")
    assert images.count() == 1 + 2 * (len(pred["rows"]) + len(runner["rows"]))
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
