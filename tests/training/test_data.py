"""Datasets: IDX files, CUB's own layout, ImageFolder trees, splits and the parts generator."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protopnet.config import Preprocessing
from training.config import AugmentConfig, DataConfig, SyntheticConfig
from training.data import (
    DatasetError,
    build_splits,
    carve_validation,
    cub_splits,
    fashion_mnist_splits,
    image_folder_splits,
    read_idx,
    stratified_order,
)
from training.synthetic import COLORS, class_part, make_image, make_split, write_image_folder
from training.transforms import TrainTransform


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(root: Path, n_train: int = 30, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    y = np.arange(n_train) % 10
    write_idx(root / "train-images-idx3-ubyte.gz", x)
    write_idx(root / "train-labels-idx1-ubyte.gz", y)
    write_idx(root / "t10k-images-idx3-ubyte.gz", x[:n_test])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", y[:n_test])
    return x, y


def test_idx_files_read_back_exactly(tmp_path: Path) -> None:
    x, y = fake_fashion(tmp_path)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), x)
    train, test = fashion_mnist_splits(tmp_path, download=False)
    assert len(train) == 30 and len(test) == 10
    assert train.labels == y.tolist()
    img = train.load(7)
    assert img.mode == "L" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img), x[7])
    assert train.class_names[9] == "Ankle boot"


def test_truncated_idx_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "t.gz"
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 5, 28, 28) + b"\0" * 100)
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(p)


def test_missing_fashion_mnist_names_both_ways_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as e:
        fashion_mnist_splits(tmp_path / "nowhere", download=False)
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg and "/usr/share/datasets/fashion-mnist" in msg
    assert "data.download: true" in msg and "train-images-idx3-ubyte" in msg


def make_cub(root: Path) -> dict[int, tuple[int, int, int, int]]:
    """A 3-class CUB_200_2011 tree in the dataset's own layout; returns crop boxes."""
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    rng = np.random.default_rng(1)
    lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes")}
    boxes = {}
    img_id = 0
    for c, cname in enumerate(classes, 1):
        for n in range(4):
            img_id += 1
            rel = f"{cname}/{cname.split('.')[1]}_{n:04d}.jpg"
            (root / "images" / cname).mkdir(parents=True, exist_ok=True)
            w, h = 60 + 5 * n, 40 + 3 * c
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / rel
            )
            x, y, bw, bh = 5.0 + n, 4.0, 30.0 + n, 20.0
            boxes[img_id] = (int(x), int(y), int(x + bw), int(y + bh))
            lines["images"].append(f"{img_id} {rel}")
            lines["labels"].append(f"{img_id} {c}")
            lines["split"].append(f"{img_id} {1 if n < 3 else 0}")
            lines["boxes"].append(f"{img_id} {x} {y} {bw} {bh}")
    (root / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(lines["boxes"]) + "\n")
    (root / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    return boxes


def test_cub_layout_crops_splits_and_names(tmp_path: Path) -> None:
    boxes = make_cub(tmp_path)
    train, test = cub_splits(tmp_path)
    assert train.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert len(train) == 9 and len(test) == 3  # train_test_split.txt: 3 + 1 per class
    assert train.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.image_id(0) == "cub:4"
    for i in range(len(train)):
        img_id = int(train.image_id(i).split(":")[1])
        x0, y0, x1, y1 = boxes[img_id]
        full = Image.open(tmp_path / str(train.image_path(i)))
        cropped = train.load(i)
        assert cropped.size == (x1 - x0, y1 - y0)  # the bird box, not the whole photo
        assert np.array_equal(np.asarray(cropped), np.asarray(full)[y0:y1, x0:x1])


def test_cub_part_locations_follow_the_crop(tmp_path: Path) -> None:
    """parts/part_locs.txt: each image's keypoints in the cropped image's pixels, by part
    id; a part outside the bird box, or marked not visible, is not visible."""
    boxes = make_cub(tmp_path)
    (tmp_path / "parts").mkdir()
    rows = []
    for img_id, (x0, y0, x1, _) in boxes.items():
        rows += [
            f"{img_id} 2 {x0 + 3}.0 {y0 + 4}.0 1",  # inside the box
            f"{img_id} 1 {x1 + 5}.0 {y0 + 1}.0 1",  # outside it
            f"{img_id} 3 {x0 + 1}.0 {y0 + 1}.0 0",  # not visible
        ]
    (tmp_path / "parts" / "part_locs.txt").write_text("\n".join(rows) + "\n")
    train, test = cub_splits(tmp_path)
    for images in (train, test):
        for i in range(len(images)):
            p = images.part_points(i)
            assert p is not None and p.shape == (3, 3)  # parts 1, 2, 3 in id order
            assert p[1].tolist() == [3.0, 4.0, 1.0]
            assert p[0, 2] == 0.0 and p[2, 2] == 0.0
    assert train.subset([2]).part_points(0).tolist() == train.part_points(2).tolist()
    (tmp_path / "parts" / "part_locs.txt").unlink()
    assert cub_splits(tmp_path)[0].part_points(0) is None


def test_cub_missing_file_is_named(tmp_path: Path) -> None:
    make_cub(tmp_path)
    (tmp_path / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetError, match=r"bounding_boxes\.txt"):
        cub_splits(tmp_path)


def test_image_folder_tree(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 1)):
        for cname in ("cat", "dog"):
            d = tmp_path / split / cname
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (9, 7), (i, 0, 0)).save(d / f"{i}.png")
            (d / "notes.txt").write_text("not an image")
    train, test = image_folder_splits(tmp_path)
    assert train.class_names == ["cat", "dog"] == test.class_names
    assert len(train) == 6 and len(test) == 2
    assert train.image_path(3) == "dog/0.png" and train.labels[3] == 1
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(
        DatasetError, match=r"class folders \['bird'\] that the training split lacks"
    ):
        image_folder_splits(tmp_path)


def test_validation_is_carved_per_class_and_keeps_a_training_image() -> None:
    labels = [0] * 50 + [1] * 10 + [2] * 1
    train, val = carve_validation(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(61)) and not set(train) & set(val)
    counts = {k: sum(labels[i] == k for i in val) for k in range(3)}
    assert counts == {0: 10, 1: 2, 2: 0}  # the single-image class stays in training
    assert carve_validation(labels, 0.2, seed=3) == (train, val)  # deterministic


def test_stratified_prefixes_keep_class_proportions() -> None:
    labels = [0] * 600 + [1] * 300 + [2] * 100
    order = stratified_order(labels, seed=0)
    assert sorted(order) == list(range(1000))
    head = [labels[i] for i in order[:100]]
    assert abs(head.count(0) - 60) <= 1 and abs(head.count(1) - 30) <= 1
    assert abs(head.count(2) - 10) <= 1


def test_build_splits_subsets_and_validation(tmp_path: Path) -> None:
    fake_fashion(tmp_path, n_train=200, n_test=50)
    data = DataConfig(kind="fashion_mnist", root=tmp_path, train_subset=100, test_subset=20)
    splits = build_splits(data, seed=0)
    assert len(splits.train) + len(splits.val) == 100 and len(splits.val) == 10
    assert len(splits.test) == 20
    assert splits.train.class_counts() == [9] * 10
    ids = {splits.train.image_id(i) for i in range(len(splits.train))}
    assert not ids & {splits.val.image_id(i) for i in range(len(splits.val))}


def test_parts_are_deterministic_and_the_box_holds_the_coloured_part() -> None:
    cfg = SyntheticConfig(num_classes=5, train_per_class=4, test_per_class=2, seed=7)
    images, labels, boxes = make_split(cfg, "train")
    again, _, _ = make_split(cfg, "train")
    assert np.array_equal(images, again)
    one, box = make_image(cfg, "train", 13, int(labels[13]))  # any order, same image
    assert np.array_equal(one, images[13]) and tuple(boxes[13]) == box
    assert not np.array_equal(make_split(cfg, "test")[0][:4], images[:4])
    for img, k, (x0, y0, x1, y1) in zip(images, labels, boxes, strict=True):
        colour = np.array(COLORS[class_part(int(k))[1]])
        hit = np.all(img == colour, axis=2)  # pixels of exactly the part's colour
        ys, xs = np.nonzero(hit)
        assert len(xs) > 0
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    assert len({class_part(k) for k in range(40)}) == 40  # every class its own part


def test_parts_written_as_image_folders(tmp_path: Path) -> None:
    cfg = SyntheticConfig(num_classes=3, train_per_class=2, test_per_class=1)
    write_image_folder(cfg, tmp_path)
    train, test = image_folder_splits(tmp_path)
    assert len(train) == 6 and len(test) == 3
    import json

    parts = json.loads((tmp_path / "parts.json").read_text())
    assert len(parts) == 9 and all(len(v["box"]) == 4 for v in parts.values())


def test_train_transform_augments_and_normalises_like_the_artifact() -> None:
    prep = Preprocessing(img_size=24, mean=(0.5,) * 3, std=(0.5,) * 3, grayscale=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20), dtype=np.uint8), "L")
    off = TrainTransform(prep, AugmentConfig(enabled=False))
    from protopnet.preprocess import eval_transform

    assert torch.equal(off(img), eval_transform(prep)(img))  # no augmentation = eval transform
    on = TrainTransform(prep, AugmentConfig())
    torch.manual_seed(0)
    a, b = on(img), on(img)
    assert a.shape == (3, 24, 24) and not torch.equal(a, b)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
