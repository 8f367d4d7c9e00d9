"""DICOM through the running service: a CT slice POSTed as application/dicom (or as a
multipart file) is explained on the picture its window gives, as a viewer shows it; a
compression this machine cannot decode gets a 415 naming it, a cut file a 400."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.dicom_files import dicom_bytes, hounsfield_phantom, jpeg_ls_dicom, window_by_hand
from tests.service.helpers import check_sheets, reference

DICOM = {"Content-Type": "application/dicom"}


def test_a_ct_slice_is_explained_on_its_windowed_picture(client, store_root) -> None:
    stored = hounsfield_phantom(96)
    r = client.post("/explain", content=dicom_bytes(stored), headers=DICOM)
    assert r.status_code == 200, r.text
    body = r.json()
    image = body["image"]
    assert (image["format"], image["mode"]) == ("DICOM", "MONOCHROME2 12-bit")
    assert image["received"] == image["oriented"] == {"width": 96, "height": 96}
    # The model saw the soft-tissue window of the slice: the logits of a brute-force
    # reference run on that picture, windowed here by the standard's formula.
    seen = window_by_hand(stored.astype(float) - 1024, 40.0, 400.0).round().astype(np.uint8)
    ref = reference(store_root, "photo@1", Image.fromarray(seen, "L"))
    check_sheets(body, ref["logits"])
    report = client.get(body["links"]["report"])
    assert report.status_code == 200 and "DICOM" in report.text


def test_a_multipart_dicom_file_and_a_second_frame_ignored(client) -> None:
    """Two frames, the second upside down: the answer is the first frame's alone."""
    first = hounsfield_phantom()
    two = np.stack([first, first[::-1]])
    files = {"image": ("slices.dcm", dicom_bytes(two, frames=2), "application/dicom")}
    r = client.post("/explain", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["image"]["frames"] == 2
    alone = client.post("/explain", content=dicom_bytes(first), headers=DICOM)
    flipped = client.post("/explain", content=dicom_bytes(first[::-1].copy()), headers=DICOM)
    logits = [[c["logit"] for c in x.json()["top_classes"]] for x in (r, alone, flipped)]
    assert logits[0] == pytest.approx(logits[1], abs=1e-5)
    assert logits[0] != pytest.approx(logits[2], abs=1e-3)  # the frames differ to the model


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda: jpeg_ls_dicom(hounsfield_phantom()), 415, "JPEG-LS Lossless"),
        (lambda: dicom_bytes(hounsfield_phantom())[:-500], 400, "DICOM pixel data"),
        (lambda: dicom_bytes(hounsfield_phantom())[:300], 400, "DICOM header"),
    ],
    ids=["jpeg-ls", "cut-pixels", "cut-header"],
)
def test_unreadable_dicom_gets_a_clear_4xx(client, make, status, message) -> None:
    r = client.post("/explain", content=make(), headers=DICOM)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
