"""Labelled image collections: ImageFolder trees, CUB-200-2011, Fashion-MNIST, synthetic parts.

An ``ImageSet`` loads untransformed images by index and knows each image's label, id and
path; transforms are applied by ``TransformedImages`` (augmented for training, the
artifact's eval transform for validation, test and push). ``build_splits`` carves a
validation split from the training data (it selects checkpoints); the test split is
only ever reported.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from protokit.dicom import DicomError, open_dicom
from protokit.image_files import (
    IMAGE_SUFFIXES,
    ImageFileError,
    class_folders,
    images_under,
    is_dicom_path,
    open_image_file,
)
from protopnet.errors import ProtoPNetError
from training import synthetic
from training.config import DataConfig

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class DatasetError(ProtoPNetError):
    """A dataset that is missing, malformed or unusable for training."""


class ImageSet:
    """Base class: ``len``, ``load(i)`` (a PIL image), ``labels``, ``class_names``, ids."""

    class_names: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        raise TypeError(f"{type(self).__name__} must implement load()")

    def image_id(self, i: int) -> str:
        return str(i)

    def image_path(self, i: int) -> str | None:
        return None

    def part_box(self, i: int) -> tuple[int, int, int, int] | None:
        """The labelled part's box (x0, y0, x1, y1) in the loaded image's pixels, where
        the data has one (the synthetic set)."""
        return None

    def part_points(self, i: int) -> np.ndarray | None:
        """(Q, 3) labelled part keypoints (x, y, visible) in the loaded image's pixels,
        where the data has them (CUB's part_locs.txt; the synthetic set's part centre)."""
        return None

    def subset(self, indices: Sequence[int]) -> ImageSet:
        return SubsetImages(self, list(indices))

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.class_names)
        for y in self.labels:
            counts[y] += 1
        return counts


class SubsetImages(ImageSet):
    def __init__(self, base: ImageSet, indices: list[int]):
        self.base, self.indices = base, indices
        self.class_names = base.class_names
        self.labels = [base.labels[i] for i in indices]

    def load(self, i: int) -> Image.Image:
        return self.base.load(self.indices[i])

    def image_id(self, i: int) -> str:
        return self.base.image_id(self.indices[i])

    def image_path(self, i: int) -> str | None:
        return self.base.image_path(self.indices[i])

    def part_box(self, i: int) -> tuple[int, int, int, int] | None:
        return self.base.part_box(self.indices[i])

    def part_points(self, i: int) -> np.ndarray | None:
        return self.base.part_points(self.indices[i])


class ArrayImages(ImageSet):
    """Images held in memory as uint8 arrays: (N, H, W) greyscale or (N, H, W, 3) RGB."""

    def __init__(
        self,
        arrays: np.ndarray,
        labels: np.ndarray,
        class_names: list[str],
        id_prefix: str,
        boxes: np.ndarray | None = None,
    ):
        if len(arrays) != len(labels):
            raise DatasetError(f"{len(arrays)} images but {len(labels)} labels")
        self.arrays = arrays
        self.labels = [int(y) for y in labels]
        self.class_names = class_names
        self.id_prefix = id_prefix
        self.boxes = boxes  # (N, 4) part boxes (synthetic data)

    def load(self, i: int) -> Image.Image:
        a = self.arrays[i]
        return Image.fromarray(a, "L" if a.ndim == 2 else "RGB")

    def image_id(self, i: int) -> str:
        return f"{self.id_prefix}/{i}"

    def part_box(self, i: int) -> tuple[int, int, int, int] | None:
        if self.boxes is None:
            return None
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        return x0, y0, x1, y1

    def part_points(self, i: int) -> np.ndarray | None:
        box = self.part_box(i)
        if box is None:
            return None
        return np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.0]])


class FileImages(ImageSet):
    """Image files under ``root``, optionally cropped (CUB's bird boxes)."""

    def __init__(
        self,
        root: Path,
        rel_paths: list[str],
        labels: list[int],
        class_names: list[str],
        ids: list[str] | None = None,
        crops: list[tuple[float, float, float, float]] | None = None,
        points: list[np.ndarray] | None = None,
    ):
        self.root = Path(root)
        self.rel_paths = rel_paths
        self.labels = labels
        self.class_names = class_names
        self.ids = ids or rel_paths
        self.crops = crops  # (x, y, w, h) per image, in original pixels
        self.points = points  # (Q, 3) part keypoints per image, in the loaded image's pixels

    def load(self, i: int) -> Image.Image:
        path = self.root / self.rel_paths[i]
        try:
            img = open_image_file(path)
        except ImageFileError as exc:
            raise DatasetError(
                f"cannot read image {str(path)!r}: {exc}; `python -m training check` lists "
                "every such file"
            ) from exc
        if self.crops is not None:
            x, y, w, h = self.crops[i]
            x0, y0 = max(0, int(x)), max(0, int(y))
            x1, y1 = min(img.width, math.ceil(x + w)), min(img.height, math.ceil(y + h))
            if x1 > x0 and y1 > y0:
                img = img.crop((x0, y0, x1, y1))
        return img

    def image_id(self, i: int) -> str:
        return self.ids[i]

    def image_path(self, i: int) -> str | None:
        return self.rel_paths[i]

    def part_points(self, i: int) -> np.ndarray | None:
        return None if self.points is None else self.points[i]


def file_path(images: ImageSet, i: int) -> Path | None:
    """The file behind image ``i`` (through subsets), or None for in-memory sets."""
    while isinstance(images, SubsetImages):
        sub: SubsetImages = images
        images, i = sub.base, sub.indices[i]
    return images.root / images.rel_paths[i] if isinstance(images, FileImages) else None


def read_error(exc: BaseException) -> str:
    """Pillow's reason without the path it repeats."""
    text = str(exc)
    return text.split(" '")[0] if text.startswith("cannot identify image file") else text


def header_problems(images: ImageSet) -> list[tuple[str, str]]:
    """(path, reason) for each file whose header Pillow cannot read (empty, not an image,
    an unsupported format); [] for in-memory sets. About 0.1 ms a file: it runs before
    every training, so such a file stops the run before its first epoch, not in it."""
    out = []
    for i in range(len(images)):
        path = file_path(images, i)
        if path is None:
            return []
        try:
            if is_dicom_path(path):
                with path.open("rb") as f:
                    open_dicom(f)  # reads the header; the pixel data is deferred
            else:
                with Image.open(path):
                    pass
        except (OSError, ValueError, Image.DecompressionBombError, DicomError) as exc:
            out.append((str(path), read_error(exc)))
    return out


# ---------------------------------------------------------------------------------------
# Readers


def image_folder(root: Path, class_names: list[str] | None = None) -> FileImages:
    """``root/<class>/<image>``; classes are the sorted sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {str(root)!r} does not exist")
    found = class_folders(root)
    if class_names is None:
        class_names = found
    unknown = [c for c in found if c not in class_names]
    if unknown:
        raise DatasetError(
            f"{str(root)!r} has class folders {unknown[:5]} that the training split lacks; "
            f"training classes: {', '.join(class_names[:20])}"
        )
    rel_paths: list[str] = []
    labels: list[int] = []
    for k, name in enumerate(class_names):
        d = root / name
        if not d.is_dir():
            continue
        for p in images_under(d):
            rel_paths.append(str(p.relative_to(root)))
            labels.append(k)
    if not rel_paths:
        raise DatasetError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}; expected "
            "one sub-folder per class"
        )
    return FileImages(root, rel_paths, labels, class_names)


def image_folder_splits(root: Path) -> tuple[FileImages, FileImages]:
    """``root/train/<class>/...`` and ``root/test/<class>/...`` (``val/`` if no test/)."""
    root = Path(root)
    train = image_folder(root / "train")
    for name in ("test", "val"):
        if (root / name).is_dir():
            return train, image_folder(root / name, train.class_names)
    raise DatasetError(f"{str(root)!r} needs train/ and test/ sub-folders (found neither test/)")


def _read_table(path: Path, ncols: int) -> dict[int, list[str]]:
    if not path.is_file():
        raise DatasetError(f"CUB file {str(path)!r} is missing")
    rows: dict[int, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=ncols - 1)
        if len(parts) != ncols:
            raise DatasetError(f"{path.name} line {n}: expected {ncols} columns, got {line!r}")
        rows[int(parts[0])] = parts[1:]
    return rows


def cub_splits(root: Path) -> tuple[FileImages, FileImages]:
    """CUB-200-2011 in its own layout: birds cropped by bounding_boxes.txt, the official
    train/test split from train_test_split.txt, class names from classes.txt; with
    parts/part_locs.txt, each image's part keypoints (in the cropped image's pixels; a
    part outside the crop is not visible)."""
    root = Path(root)
    images = _read_table(root / "images.txt", 2)
    labels = _read_table(root / "image_class_labels.txt", 2)
    split = _read_table(root / "train_test_split.txt", 2)
    boxes = _read_table(root / "bounding_boxes.txt", 5)
    classes = _read_table(root / "classes.txt", 2)
    class_ids = sorted(classes)
    names = [classes[c][0].split(".", 1)[-1] for c in class_ids]
    index_of = {c: k for k, c in enumerate(class_ids)}
    locs = _part_locs(root / "parts" / "part_locs.txt")
    out: dict[str, tuple[list[str], list[int], list[str], list[tuple[float, ...]]]] = {
        "train": ([], [], [], []),
        "test": ([], [], [], []),
    }
    points: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for img_id in sorted(images):
        for table, what in ((labels, "a class"), (split, "a split"), (boxes, "a box")):
            if img_id not in table:
                raise DatasetError(f"CUB image {img_id} has no {what} entry")
        cls = int(labels[img_id][0])
        if cls not in index_of:
            raise DatasetError(f"CUB image {img_id} has class {cls}, not in classes.txt")
        which = "train" if split[img_id][0] == "1" else "test"
        paths, labs, ids, crops = out[which]
        paths.append(f"images/{images[img_id][0]}")
        labs.append(index_of[cls])
        ids.append(f"cub:{img_id}")
        crops.append(tuple(float(v) for v in boxes[img_id]))
        if locs is not None:
            x, y, w, h = crops[-1]
            p = locs.get(img_id, np.zeros((0, 3))).copy()
            p[:, 0] -= max(0, int(x))  # the crop FileImages.load makes
            p[:, 1] -= max(0, int(y))
            inside = (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
            p[:, 2] = p[:, 2] * inside
            points[which].append(p)
    sets = []
    for which in ("train", "test"):
        paths, labs, ids, crops = out[which]
        if not paths:
            raise DatasetError(f"CUB at {str(root)!r} has no {which} images")
        pts = points[which] if locs is not None else None
        sets.append(FileImages(root, paths, labs, names, ids, crops, pts))  # type: ignore[arg-type]
    return sets[0], sets[1]


def _part_locs(path: Path) -> dict[int, np.ndarray] | None:
    """CUB's parts/part_locs.txt (image id, part id, x, y, visible) -> per image a
    (Q, 3) array ordered by part id; None when the file is absent."""
    if not path.is_file():
        return None
    rows: dict[int, dict[int, tuple[float, float, float]]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 5:
            raise DatasetError(f"part_locs.txt line {n}: expected 5 columns, got {line!r}")
        img, part = int(parts[0]), int(parts[1])
        rows.setdefault(img, {})[part] = (float(parts[2]), float(parts[3]), float(parts[4]))
    ids = sorted({q for r in rows.values() for q in r})
    return {
        img: np.array([r.get(q, (0.0, 0.0, 0.0)) for q in ids], dtype=np.float64)
        for img, r in rows.items()
    }


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or raw): magic, dimension sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        data = f.read()
    if len(data) < 4:
        raise DatasetError(f"{str(path)!r} is too short to be an IDX file")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DatasetError(f"{str(path)!r} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{str(path)!r} is truncated: {body.size} of {np.prod(dims)} bytes")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def fashion_mnist_splits(root: Path | None, download: bool) -> tuple[ArrayImages, ArrayImages]:
    """Fashion-MNIST from its IDX files: Debian's ``dataset-fashion-mnist`` path by
    default, or torchvision's download (needs a network) with ``download: true``."""
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    stems = {
        "train_x": "train-images-idx3-ubyte",
        "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte",
        "test_y": "t10k-labels-idx1-ubyte",
    }
    paths = {k: _find_idx(folder, s) for k, s in stems.items()}
    if any(p is None for p in paths.values()) and download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(folder), train=True, download=True)
            FashionMNIST(str(folder), train=False, download=True)
        except Exception as exc:  # network or disk: say what was tried
            raise DatasetError(
                f"downloading Fashion-MNIST into {str(folder)!r} failed: {exc}"
            ) from exc
        paths = {k: _find_idx(folder, s) for k, s in stems.items()}
    missing = [stems[k] for k, p in paths.items() if p is None]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST IDX files {', '.join(missing)} not found in {str(folder)!r}. "
            f"Either install the Debian package dataset-fashion-mnist (files land in "
            f"{FASHION_MNIST_DIR}), or set data.download: true to fetch them with "
            f"torchvision (needs a network), or point data.root at a folder holding them."
        )
    arrays = {k: read_idx(p) for k, p in paths.items() if p is not None}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(f"Fashion-MNIST {split} images {x.shape} and labels {y.shape}")
        out.append(ArrayImages(x, y, list(FASHION_MNIST_CLASSES), f"fashion-mnist/{split}"))
    return out[0], out[1]


def synthetic_splits(data: DataConfig) -> tuple[ArrayImages, ArrayImages]:
    cfg = data.synthetic
    names = synthetic.class_names(cfg.num_classes)
    out = []
    for split in ("train", "test"):
        images, labels, boxes = synthetic.make_split(cfg, split)
        out.append(ArrayImages(images, labels, names, f"parts/{split}", boxes))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------
# Splits


def stratified_order(labels: Sequence[int], seed: int) -> list[int]:
    """A seeded permutation whose every prefix holds each class in proportion."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    keyed: list[tuple[float, int]] = []
    for members in by_class.values():
        perm = rng.permutation(len(members))
        offset = rng.random()
        for rank, j in enumerate(perm):
            keyed.append(((rank + offset) / len(members), members[int(j)]))
    keyed.sort()
    return [i for _, i in keyed]


def carve_validation(
    labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train indices, val indices): ``fraction`` of each class goes to validation, but
    every class keeps at least one training image (push needs one)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for members in by_class.values():
        perm = [members[int(j)] for j in rng.permutation(len(members))]
        n_val = min(round(len(members) * fraction), len(members) - 1)
        val += perm[:n_val]
        train += perm[n_val:]
    return sorted(train), sorted(val)


@dataclass
class Splits:
    """train: augmented for SGD and unaugmented for push; val selects checkpoints;
    test is only reported."""

    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def load_source(data: DataConfig) -> tuple[ImageSet, ImageSet]:
    """The dataset's own train and test sets, before subsets and the validation split."""
    if data.kind == "synthetic":
        return synthetic_splits(data)
    if data.kind == "fashion_mnist":
        return fashion_mnist_splits(data.root, data.download)
    assert data.root is not None  # the config validator requires it
    if data.kind == "cub":
        return cub_splits(data.root)
    return image_folder_splits(data.root)


def build_splits(data: DataConfig, seed: int) -> Splits:
    train_full, test = load_source(data)
    if data.train_subset is not None and data.train_subset < len(train_full):
        order = stratified_order(train_full.labels, seed)
        train_full = train_full.subset(sorted(order[: data.train_subset]))
    if data.test_subset is not None and data.test_subset < len(test):
        order = stratified_order(test.labels, seed + 1)
        test = test.subset(sorted(order[: data.test_subset]))
    tr, va = carve_validation(train_full.labels, data.val_fraction, seed)
    empty = [train_full.class_names[k] for k, n in enumerate(train_full.class_counts()) if n == 0]
    if empty:
        raise DatasetError(
            f"classes {empty[:10]} have no training image (push needs at least one per class)"
        )
    bad = header_problems(train_full) + header_problems(test)
    if bad:
        listed = "; ".join(f"{path}: {why}" for path, why in bad[:10])
        raise DatasetError(
            f"{len(bad)} image files cannot be read ({listed}{'; ...' if len(bad) > 10 else ''}); "
            "remove or replace them (`python -m training check --config ...` checks every "
            "image and lists every problem)"
        )
    return Splits(train=train_full.subset(tr), val=train_full.subset(va), test=test)


# ---------------------------------------------------------------------------------------
# Torch side


class TransformedImages(Dataset[tuple[torch.Tensor, int, int]]):
    """(transformed image, label, index into the ImageSet) for a DataLoader."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(self.images.load(i)), self.images.labels[i], i
