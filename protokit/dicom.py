"""DICOM files (the format of CT, MR, X-ray and most other medical images) as pictures.

Bytes in, an 8-bit PIL image out, as a radiologist's viewer would show it: pydicom reads
the file and applies the modality LUT (rescale to Hounsfield units for CT) and the
file's VOI LUT or window (center and width); MONOCHROME1 images (white = low) are
inverted. A file without a window is shown from its own minimum to its maximum.
Multi-frame files give their first frame, as animations do elsewhere. Nothing here
reads paths or unpickles: a file is only parsed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from protopnet.errors import ProtoPNetError

MAGIC_OFFSET = 128  # a DICOM file: a 128-byte preamble, then "DICM"


class DicomError(ProtoPNetError):
    """A DICOM file that cannot be read: ``kind`` says whether it is corrupt, encoded in
    a way this machine cannot decode ("unsupported"), or larger than allowed."""

    def __init__(self, message: str, kind: Literal["corrupt", "unsupported", "too_large"]):
        super().__init__(message)
        self.kind = kind


def is_dicom(data: bytes) -> bool:
    return data[MAGIC_OFFSET : MAGIC_OFFSET + 4] == b"DICM"


@dataclass
class DicomFile:
    """A parsed DICOM file whose pixels are not decoded yet (nor, when they are large,
    read: pydicom defers them until ``decode``)."""

    dataset: pydicom.Dataset
    size: tuple[int, int]  # (width, height)
    n_frames: int
    transfer_syntax: str  # its name, e.g. "Explicit VR Little Endian"
    format = "DICOM"

    @property
    def mode(self) -> str:
        """The photometric interpretation and bit depth, e.g. "MONOCHROME2 12-bit"."""
        ds = self.dataset
        photometric = str(ds.get("PhotometricInterpretation", "unknown"))
        return f"{photometric} {int(ds.get('BitsStored', ds.get('BitsAllocated', 8)))}-bit"

    def decode(self) -> Image.Image:
        """The first frame, windowed to 8 bits: "L" for greyscale, "RGB" for colour."""
        ds = self.dataset
        try:
            arr = pydicom.pixels.pixel_array(ds, index=0)
        except (NotImplementedError, RuntimeError) as e:
            # pydicom: no decoder installed for this compression, or every one failed.
            if isinstance(e, NotImplementedError) or "missing dependencies" in str(e):
                raise DicomError(
                    f"DICOM pixel data compressed as {self.transfer_syntax} cannot be "
                    "decoded here; send it uncompressed, RLE, JPEG baseline or JPEG 2000",
                    "unsupported",
                ) from None
            raise DicomError(f"the DICOM pixel data is corrupt: {e}", "corrupt") from None
        except (InvalidDicomError, ValueError, AttributeError, KeyError, OSError, EOFError) as e:
            raise DicomError(
                f"the DICOM pixel data is missing or corrupt: {e}", "corrupt"
            ) from None
        if arr.ndim == 3 and arr.shape[-1] == 3:  # colour: pydicom gives RGB
            return Image.fromarray(_to_uint8(arr), "RGB")
        if arr.ndim != 2:
            raise DicomError(f"a DICOM frame of shape {arr.shape} is not an image", "corrupt")
        values = apply_modality_lut(arr, ds).astype(np.float64)
        windowed = apply_voi_lut(values, ds)
        if windowed is values:  # no window or VOI LUT: its own range
            lo, hi = float(values.min()), float(values.max())
        else:
            # The window's output range, found by passing it the two extremes: pydicom
            # maps into a range that depends on the stored bits and the rescale.
            lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds))
        scaled = (windowed - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        grey = scaled.round().clip(0, 255).astype(np.uint8)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            grey = 255 - grey  # white is low in MONOCHROME1
        return Image.fromarray(grey, "L")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    hi = float(arr.max()) or 1.0
    return (arr.astype(np.float64) * (255.0 / hi)).round().clip(0, 255).astype(np.uint8)


DEFER_BYTES = 64 * 1024  # values this large (the pixel data) are read only when used


def open_dicom(source: bytes | BinaryIO, max_pixels: int | None = None) -> DicomFile:
    """Parse the file once, its pixel data deferred, and check the declared size.

    ``source``: the file's bytes, or an open binary file (enough for the header; it must
    stay open until ``decode``)."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = pydicom.dcmread(stream, defer_size=DEFER_BYTES)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (InvalidDicomError, ValueError, AttributeError, KeyError, OSError, EOFError) as e:
        raise DicomError(f"could not read the DICOM header: {e}", "corrupt") from None
    if rows < 1 or cols < 1:
        raise DicomError(f"the DICOM file declares an empty size {cols} x {rows}", "corrupt")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if max_pixels is not None and rows * cols > max_pixels:
        raise DicomError(
            f"the DICOM image declares {cols} x {rows} = {rows * cols} pixels; the limit is "
            f"{max_pixels}",
            "too_large",
        )
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    name = syntax.name if syntax is not None else "an unknown transfer syntax"
    return DicomFile(ds, (cols, rows), frames, name)
