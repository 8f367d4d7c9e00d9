"""``python -m training check``: what would spoil a training run, found before it starts.

A real folder of JPEGs and PNGs with the faults an exported dataset has: an empty file, a
text file named .jpg, a truncated JPEG, a test image copied from train (a leak), and one
image filed under two classes. The real command lists each by path with its reason and
exits 1; ``train`` on the same folder stops before its first epoch, writing nothing, and
names every file whose header is unreadable at once.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.dicom_files import dicom_bytes, hounsfield_phantom, window_by_hand
from tests.training.conftest import run_cli
from training.check import check_dataset, check_sets
from training.config import load_config
from training.data import ArrayImages, DatasetError, build_splits

CLASSES = ("cat", "dog")


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(24 + seed % 9, 30, 3), dtype=np.uint8))


def write_clean(root: Path, per_class: int = 4) -> None:
    seed = 0
    for split in ("train", "test"):
        for k in CLASSES:
            (root / split / k).mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                _picture(seed).save(root / split / k / f"{i}.{'png' if i % 2 else 'jpg'}")


def write_config(root: Path, tmp: Path) -> Path:
    path = tmp / "my.yaml"
    path.write_text(
        f"name: mine\ndata: {{kind: imagefolder, root: {root}, num_workers: 0}}\n"
        "model: {backbone: tiny_cnn, img_size: 32, prototypes_per_class: 1}\n"
        f"train: {{epochs: 1}}\nruns_dir: {tmp / 'runs'}\n"
    )
    return path


def spoil(root: Path) -> dict[str, str]:
    """The faults, by the path each is reported under."""
    jpeg = io.BytesIO()
    _picture(99).resize((200, 160)).save(jpeg, "JPEG", quality=95)
    faults = {
        "train/cat/empty.png": b"",
        "train/dog/notes.jpg": b"these are my notes, not a picture\n",
        "test/dog/cut.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
    }
    for rel, data in faults.items():
        (root / rel).write_bytes(data)
    shutil.copy(root / "train/cat/1.png", root / "test/cat/leaked.png")
    shutil.copy(root / "train/cat/2.jpg", root / "train/dog/misfiled.jpg")
    return {str(root / rel): rel for rel in [*faults, "test/cat/leaked.png"]}


def test_a_clean_folder_passes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_clean(root)
    done = run_cli("check", "--config", str(write_config(root, tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "2 classes" in out
    assert (
        "train: 8 images, 4 to 4 per class; sizes 30x25 to 30x32; modes RGB 8" in out
    )  # 24 + seed % 9 px tall
    assert "no errors, 0 warnings" in out


def test_check_names_every_fault_and_train_stops_before_its_first_epoch(
    tmp_path: Path,
) -> None:
    root = tmp_path / "data"
    write_clean(root)
    spoil(root)
    config = write_config(root, tmp_path)
    report_path = tmp_path / "report.json"
    done = run_cli("check", "--config", str(config), "--json", str(report_path))
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "ERROR: 3 images cannot be read:" in out
    assert f"{root}/train/cat/empty.png: empty file" in out
    assert f"{root}/train/dog/notes.jpg: cannot identify image file" in out
    assert f"{root}/test/dog/cut.jpg: image file is truncated" in out
    assert "ERROR: 1 images are filed under more than one class:" in out
    assert f"{root}/train/cat/2.jpg (cat)  =  {root}/train/dog/misfiled.jpg (dog)" in out
    assert "WARNING: 1 test images are also in train" in out
    assert f"{root}/test/cat/leaked.png  =  {root}/train/cat/1.png" in out
    assert "4 errors, 1 warnings" in out
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and (report["errors"], report["warnings"]) == (4, 1)
    assert {u["image"] for u in report["unreadable"]} == {
        f"{root}/train/cat/empty.png",
        f"{root}/train/dog/notes.jpg",
        f"{root}/test/dog/cut.jpg",
    }
    assert report["counts"] == {"train": [5, 6], "test": [5, 5]}

    # Training stops at once: both unreadable headers named in one message, nothing written.
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr
    assert "2 image files cannot be read" in err
    assert "train/cat/empty.png" in err and "train/dog/notes.jpg" in err
    assert "python -m training check" in err
    assert not (tmp_path / "runs").exists()


def test_the_truncated_file_alone_is_named_when_training_reads_it(tmp_path: Path) -> None:
    """A truncated JPEG has a good header, so only decoding finds it: the error, raised
    where the image is read, names it and points to the check."""
    root = tmp_path / "data"
    write_clean(root, per_class=2)
    jpeg = io.BytesIO()
    _picture(7).resize((200, 160)).save(jpeg, "JPEG", quality=95)
    (root / "train/dog/cut.jpg").write_bytes(jpeg.getvalue()[:900])
    cfg = load_config(str(write_config(root, tmp_path)))
    splits = build_splits(cfg.data, seed=0)  # headers are fine
    train = splits.train
    i = next(i for i in range(len(train)) if train.image_id(i).endswith("cut.jpg"))
    with pytest.raises(DatasetError, match=r"cut\.jpg.*training check"):
        train.load(i)
    report = check_dataset(cfg.data, threads=2, progress=False)
    assert [u["image"] for u in report.unreadable] == [str(root / "train/dog/cut.jpg")]


def test_in_memory_sets_compare_pixels(tmp_path: Path) -> None:
    """Fashion-MNIST-like sets have no files: copies are found by their pixels. Train
    image 1 is again train image 4 under another class, train image 2 again as train
    image 5 (same class) and as test image 0; the synthetic generator's own sets are
    clean."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(6, 12, 12), dtype=np.uint8)
    x[4], x[5] = x[1], x[2]
    train = ArrayImages(x, np.array([0, 0, 1, 1, 1, 1]), ["a", "b"], "mem/train")
    t = rng.integers(0, 256, size=(3, 12, 12), dtype=np.uint8)
    t[0] = x[2]
    test = ArrayImages(t, np.array([1, 0, 1]), ["a", "b"], "mem/test")
    report = check_sets(train, test, threads=2, progress=False)
    assert report.conflicts == [{"images": ["mem/train/1", "mem/train/4"], "classes": ["a", "b"]}]
    assert report.leaks == [{"test": "mem/test/0", "train": "mem/train/2"}]
    assert report.duplicates == {"train": 1}
    assert (report.errors, report.warnings) == (1, 2)

    cfg = load_config(
        "synthetic", ["data.synthetic.train_per_class=4", "data.synthetic.test_per_class=2"]
    )
    report = check_dataset(cfg.data, threads=2, progress=False)
    assert report.errors == 0 and report.warnings == 0
    assert sum(report.counts["train"]) == 4 * len(report.classes)


def test_dicom_folders_load_windowed_and_are_checked(tmp_path: Path) -> None:
    """A folder of .dcm slices trains like any other: each loads as its window shows it,
    and a cut file is caught by the header check before training."""
    root = tmp_path / "data"
    slices = {"air": hounsfield_phantom(32) * 0 + 24, "disc": hounsfield_phantom(32)}
    for split in ("train", "test"):
        for k, stored in slices.items():
            (root / split / k).mkdir(parents=True)
            for i in range(3):
                (root / split / k / f"{i}.dcm").write_bytes(dicom_bytes(np.roll(stored, i, 1)))
    cfg = load_config(str(write_config(root, tmp_path)))
    splits = build_splits(cfg.data, seed=0)
    i = next(i for i in range(len(splits.train)) if splits.train.image_id(i) == "disc/0.dcm")
    seen = np.asarray(splits.train.load(i), dtype=float)
    expected = window_by_hand(slices["disc"].astype(float) - 1024, 40.0, 400.0)
    assert np.abs(seen - expected).max() <= 0.51
    report = check_dataset(cfg.data, threads=2, progress=False)
    assert report.errors == 0 and report.modes["train"] == {"L": 6}
    (root / "train/disc/0.dcm").write_bytes(dicom_bytes(slices["disc"])[:300])
    with pytest.raises(DatasetError, match=r"1 image files cannot be read .*disc/0\.dcm"):
        build_splits(cfg.data, seed=0)
