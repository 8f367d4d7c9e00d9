"""DICOM files shown as a radiologist's viewer shows them: rescaled to Hounsfield units,
windowed by the file's center and width (checked against the standard's formula by
hand), MONOCHROME1 inverted, the first frame of several; and errors that say which."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from protokit.dicom import DicomError, is_dicom, open_dicom
from tests.dicom_files import dicom_bytes, hounsfield_phantom, jpeg_ls_dicom, window_by_hand


def test_ct_slice_is_windowed_like_the_standard_says() -> None:
    stored = hounsfield_phantom()
    data = dicom_bytes(stored, window=(40.0, 400.0))
    # The "DICM" magic at byte 128 is what marks a DICOM file; any other four bytes do not.
    assert is_dicom(data) and not is_dicom(data[:128] + b"NOPE" + data[132:])
    f = open_dicom(data)
    assert (f.size, f.n_frames, f.mode) == ((64, 64), 1, "MONOCHROME2 12-bit")
    assert f.transfer_syntax == "Explicit VR Little Endian"
    img = f.decode()
    assert img.mode == "L" and img.size == (64, 64)
    expected = window_by_hand(stored.astype(float) - 1024, 40.0, 400.0)
    assert np.abs(np.asarray(img, dtype=float) - expected).max() <= 0.51
    # A bone window shows the same slice differently: the soft tissue goes dark.
    bone = np.asarray(open_dicom(dicom_bytes(stored, window=(500.0, 2000.0))).decode())
    soft_mask = np.abs(stored.astype(float) - 1024 - 40) < 25
    assert bone[soft_mask].mean() < np.asarray(img)[soft_mask].mean() - 30


def test_without_a_window_the_full_range_is_shown() -> None:
    stored = hounsfield_phantom()
    img = np.asarray(open_dicom(dicom_bytes(stored, window=None)).decode(), dtype=float)
    hu = stored.astype(float) - 1024
    expected = (hu - hu.min()) / (hu.max() - hu.min()) * 255
    assert np.abs(img - expected).max() <= 0.51


def test_monochrome1_is_inverted_and_the_first_frame_is_used() -> None:
    stored = hounsfield_phantom()
    m2 = np.asarray(open_dicom(dicom_bytes(stored)).decode()).astype(int)
    m1 = np.asarray(open_dicom(dicom_bytes(stored, photometric="MONOCHROME1")).decode())
    assert (m1.astype(int) == 255 - m2).all()
    two = np.stack([stored, stored[::-1]])
    f = open_dicom(dicom_bytes(two, frames=2))
    assert f.n_frames == 2 and (np.asarray(f.decode()).astype(int) == m2).all()


def test_rgb_passes_through() -> None:
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[..., 0], rgb[:, 6:, 2] = 200, 90
    img = open_dicom(dicom_bytes(rgb, rescale=None, window=None)).decode()
    assert img.mode == "RGB" and (np.asarray(img) == rgb).all()


def test_errors_say_what_is_wrong() -> None:
    data = dicom_bytes(hounsfield_phantom())
    with pytest.raises(DicomError, match="could not read the DICOM header") as e:
        open_dicom(data[:200])
    assert e.value.kind == "corrupt"
    with pytest.raises(DicomError, match="missing or corrupt") as e:
        open_dicom(data[:-100]).decode()
    assert e.value.kind == "corrupt"
    with pytest.raises(DicomError, match="4096 pixels; the limit is 1000") as e:
        open_dicom(data, max_pixels=1000)
    assert e.value.kind == "too_large"
    with pytest.raises(DicomError, match=r"JPEG-LS Lossless.*cannot be decoded here") as e:
        open_dicom(jpeg_ls_dicom(hounsfield_phantom())).decode()
    assert e.value.kind == "unsupported"


def test_rle_and_jpeg_2000_pixel_data_decode() -> None:
    """Two of the compressions the README names: RLE (pydicom's own codec) and lossless
    JPEG 2000 (through Pillow's OpenJPEG) give the uncompressed file's picture."""
    stored = hounsfield_phantom()
    plain = np.asarray(open_dicom(dicom_bytes(stored)).decode())
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(stored)))
    ds.compress(RLELossless)
    assert (np.asarray(open_dicom(_saved(ds)).decode()) == plain).all()
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(plain, bits=8, signed=False, rescale=None)))
    del ds.WindowCenter, ds.WindowWidth
    ds.BitsAllocated = 8
    j2k = io.BytesIO()
    Image.fromarray(plain).save(j2k, "JPEG2000", irreversible=False, no_jp2=True)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([j2k.getvalue()])
    ds["PixelData"].VR = "OB"
    assert (np.asarray(open_dicom(_saved(ds)).decode()) == plain).all()


def _saved(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
