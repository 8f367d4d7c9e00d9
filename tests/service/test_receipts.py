"""faithfulness=true through the real server: a receipt on every shown row, the same
numbers as the deletion test run by hand on the decoded image, deterministic, cached
under its own id, and shown on the report page in words."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from model_store import ModelStore
from protopnet.faithfulness import deletion_scores
from protopnet.preprocess import eval_transform, input_region, to_model_mode
from tests.service.corpus import encode
from tests.service.helpers import post_image


def test_every_shown_row_gets_a_receipt_that_a_hand_test_reproduces(
    client, store_root: Path, photo_images
) -> None:
    img = photo_images["cat"]
    data = encode(img, "PNG")
    plain = post_image(client, data, top_prototypes=3).json()
    r = post_image(client, data, top_prototypes=3, faithfulness="true")
    assert r.status_code == 200 and r.headers["x-cache"] == "miss"
    body = r.json()
    assert body["id"] != plain["id"]  # its own cache entry
    assert all(p["receipt"] is None for p in plain["prototypes"])
    assert len(body["prototypes"]) == len(plain["prototypes"])
    for p in body["prototypes"]:
        rc = p["receipt"]
        assert rc["verdict"] in ("faithful", "doubtful")
        assert (rc["verdict"] == "faithful") == (
            rc["deletion_ratio"] <= 0.8 * rc["random_deletion_ratio"]
        )
    # The box's own ratio, by hand: the shown box mapped onto the model input, blanked,
    # the similarity read at the prototype's closest cell.
    loaded = ModelStore(store_root).load("photo@1")
    prep = loaded.manifest.preprocessing
    x = eval_transform(prep)(to_model_mode(img, prep))
    W, H = img.size
    rx0, ry0, rx1, ry1 = input_region(W, H, prep)
    S = prep.img_size
    cells = {t["prototype"]: t["latent_cell"] for t in body["top_prototypes"]}
    for p in body["prototypes"]:
        if p["prototype"] not in cells:
            continue
        b = p["box"]
        sx, sy = S / (rx1 - rx0), S / (ry1 - ry0)
        box = [
            math.floor((b["x0"] - rx0) * sx), math.floor((b["y0"] - ry0) * sy),
            math.ceil((b["x1"] - rx0) * sx), math.ceil((b["y1"] - ry0) * sy),
        ]  # fmt: skip
        c = cells[p["prototype"]]
        hand = deletion_scores(
            loaded.model, x, [p["prototype"]], torch.tensor([box]), torch.tensor([[c["h"], c["w"]]])
        )
        assert abs(p["receipt"]["deletion_ratio"] - float(hand.ratio[0])) < 1e-4
    # The same request again: answered from the cache, the same receipts.
    again = post_image(client, data, top_prototypes=3, faithfulness="true")
    assert again.headers["x-cache"] == "hit" and again.json() == body


def test_the_report_checks_every_row_even_without_the_option(client, photo_images) -> None:
    """The report's rows always carry a receipt: the JSON's when it has them, else made
    for the page from the kept model input (float16), and then the same verdicts and
    ratios within float16's rounding as faithfulness=true gives."""
    data = encode(photo_images["coffee"], "PNG")
    checked = post_image(client, data, faithfulness="true").json()
    unchecked = post_image(client, data).json()
    receipt_of = {p["prototype"]: p["receipt"] for p in checked["prototypes"]}
    words = {"faithful": "box checked", "doubtful": "box not confirmed"}
    for body in (checked, unchecked):
        page = client.get(body["links"]["report"]).text
        assert "Hiding the box leaves" in page and "not checked" not in page
        for row in body["scoring_sheets"][0]["rows"]:
            assert words[receipt_of[row["prototype"]]["verdict"]] in page
    # The page's own receipts, as the JSON would give them: every ratio printed there is
    # the faithfulness=true one to the percent (float16 input: within rounding).
    page = client.get(unchecked["links"]["report"]).text
    for row in unchecked["scoring_sheets"][0]["rows"]:
        rc = receipt_of[row["prototype"]]
        near = {f"{round(rc['deletion_ratio'] * 100 + d)}% of the match" for d in (-1, 0, 1)}
        assert any(n in page for n in near), (row["prototype"], rc)
    assert client.get(unchecked["links"]["report"]).text == page  # cached: the same page
