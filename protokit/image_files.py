"""Image files on disk: which suffixes count as images, the folders of a dataset laid out
as ``<class>/<image>``, and opening one file (DICOM among them). Training's readers and
the model store's importer both walk and open folders through here."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from protokit.dicom import DicomError, open_dicom

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", *DICOM_SUFFIXES,
)  # fmt: skip


class ImageFileError(OSError):
    """A file that does not open as an image; the message says why."""


def is_dicom_path(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def class_folders(root: Path) -> list[str]:
    """The sorted names of ``root``'s sub-folders, hidden ones left out."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def images_under(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (any depth), sorted; hidden files left out."""
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]


def open_image_file(path: Path) -> Image.Image:
    """The image in ``path``, decoded (a DICOM file: its windowed picture); raises
    ImageFileError naming the reason."""
    try:
        img: Image.Image = (
            open_dicom(path.read_bytes()).decode() if is_dicom_path(path) else Image.open(path)
        )
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError, DicomError) as exc:
        raise ImageFileError(str(exc)) from exc
    return img
