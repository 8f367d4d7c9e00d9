"""Real DICOM files for the tests, written with pydicom as a scanner's export would be."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid


def dicom_bytes(
    pixels: np.ndarray,
    *,
    bits: int = 12,
    signed: bool = True,
    rescale: tuple[float, float] | None = (1.0, -1024.0),  # slope, intercept: CT's HU
    window: tuple[float, float] | None = (40.0, 400.0),  # center, width: a soft-tissue window
    photometric: str = "MONOCHROME2",
    frames: int | None = None,
) -> bytes:
    """A CT-like file: (H, W) or (frames, H, W) stored values, or (H, W, 3) uint8 RGB."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    rgb = pixels.ndim == 3 and frames is None
    ds.Rows, ds.Columns = pixels.shape[:2] if rgb or frames is None else pixels.shape[1:]
    if rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        stored = pixels.astype(np.uint8)
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
        ds.PixelRepresentation = int(signed)
        stored = pixels.astype(np.int16 if signed else np.uint16)
    if frames is not None:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def jpeg_ls_dicom(pixels: np.ndarray) -> bytes:
    """A file that declares JPEG-LS compression, which no installed decoder reads."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dicom_bytes(pixels)))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS"])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def hounsfield_phantom(size: int = 64) -> np.ndarray:
    """Stored values of a CT-like slice: air around a soft-tissue disc with a bone ring
    and a fat spot (stored = HU + 1024)."""
    y, x = np.mgrid[:size, :size]
    r = np.hypot(x - size / 2, y - size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < size * 0.42] = 1000.0  # bone
    hu[r < size * 0.36] = 40.0  # soft tissue
    hu[np.hypot(x - size * 0.4, y - size * 0.45) < size * 0.08] = -100.0  # fat
    hu += np.linspace(-20, 20, size)[None, :]  # a gentle gradient
    return (hu + 1024).round().astype(np.int16)


def window_by_hand(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, the linear window, to 0..255."""
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((hu - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.where(hu <= lo, 0, np.where(hu > hi, 255, y))
