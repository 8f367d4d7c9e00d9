"""What to know about a dataset before spending hours training on it.

    python -m training check --config my.yaml [--json report.json] [--strict]

``check_dataset`` decodes every image of the config's train and test sets (on a few
threads: Pillow releases the GIL while decoding) and reports, all at once:

- errors (exit status 1): files that cannot be read (empty, not an image, truncated),
  classes with no training image, the same image (byte for byte, or pixel for pixel for
  in-memory sets) filed under two classes;
- warnings (exit status 1 only with ``--strict``): the same image in train and in test,
  which makes the test accuracy a measure of memory; duplicates within a split;
- per split and class: how many images, their sizes and modes.

The cheap part, ``training.data.header_problems``, runs before every training: it opens
each file's header only (about 0.1 ms a file), so an empty or non-image file stops a run
before its first epoch, every such file named at once, rather than mid-epoch.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from training.config import DataConfig
from training.data import DatasetError, ImageSet, file_path, load_source, read_error

SHOW = 20  # problems listed per kind in the text report (the JSON has all of them)


@dataclass
class ImageFacts:
    sha256: str | None  # of the file's bytes (files) or the pixels (in-memory sets)
    size: tuple[int, int] | None  # (width, height)
    mode: str | None
    error: str | None  # why it cannot be read


def _facts(images: ImageSet, i: int) -> ImageFacts:
    path = file_path(images, i)
    try:
        if path is not None:
            data = path.read_bytes()
            if not data:
                return ImageFacts(None, None, None, "empty file")
            digest = hashlib.sha256(data).hexdigest()
        img = images.load(i)  # decodes every pixel: a truncated file fails here
        img.load()
        if path is None:
            digest = hashlib.sha256(img.tobytes() + img.mode.encode()).hexdigest()
        return ImageFacts(digest, img.size, img.mode, None)
    except (OSError, ValueError, Image.DecompressionBombError, DatasetError) as exc:
        cause = exc.__cause__ or exc  # a DatasetError names the path; the cause is why
        return ImageFacts(None, None, None, read_error(cause))


@dataclass
class DataReport:
    classes: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    sizes: dict[str, dict[str, list[int]]]  # split -> min/max (width, height)
    modes: dict[str, dict[str, int]]  # split -> Pillow mode -> images
    unreadable: list[dict[str, str]] = field(default_factory=list)  # split, image, reason
    empty_classes: list[str] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)  # one image, 2+ classes
    leaks: list[dict[str, Any]] = field(default_factory=list)  # one image, train and test
    duplicates: dict[str, int] = field(default_factory=dict)  # split -> extra copies

    @property
    def errors(self) -> int:
        return len(self.unreadable) + len(self.empty_classes) + len(self.conflicts)

    @property
    def warnings(self) -> int:
        return len(self.leaks) + sum(self.duplicates.values())

    def to_json(self) -> dict[str, Any]:
        counts = {"ok": self.errors == 0, "errors": self.errors, "warnings": self.warnings}
        return counts | asdict(self)

    def lines(self) -> Iterator[str]:
        """The report for a person, most important first."""
        yield f"{len(self.classes)} classes"
        for split, counts in self.counts.items():
            lo, hi = self.sizes[split]["min"], self.sizes[split]["max"]
            modes = ", ".join(f"{m} {n}" for m, n in sorted(self.modes[split].items()))
            yield (
                f"{split}: {sum(counts)} images, {min(counts)} to {max(counts)} per class; "
                f"sizes {lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}; modes {modes or '-'}"
            )
        if self.unreadable:
            yield f"ERROR: {len(self.unreadable)} images cannot be read:"
            yield from (f"  {u['image']}: {u['reason']}" for u in self.unreadable[:SHOW])
        if self.empty_classes:
            yield f"ERROR: classes with no training image: {', '.join(self.empty_classes)}"
        if self.conflicts:
            yield f"ERROR: {len(self.conflicts)} images are filed under more than one class:"
            for c in self.conflicts[:SHOW]:
                pairs = zip(c["images"], c["classes"], strict=True)
                yield "  " + "  =  ".join(f"{p} ({k})" for p, k in pairs)
        if self.leaks:
            yield (
                f"WARNING: {len(self.leaks)} test images are also in train (the test accuracy "
                "would count them as new):"
            )
            for leak in self.leaks[:SHOW]:
                yield f"  {leak['test']}  =  {leak['train']}"
        for split, n in self.duplicates.items():
            yield f"WARNING: {split} holds {n} extra copies of images it already has"
        shown = [u for u in (self.unreadable, self.conflicts, self.leaks) if len(u) > SHOW]
        if shown:
            yield f"(the first {SHOW} of each are listed; --json writes them all)"
        verdict = "no errors" if self.errors == 0 else f"{self.errors} errors"
        yield f"{verdict}, {self.warnings} warnings"


def check_dataset(data: DataConfig, threads: int = 4, progress: bool = True) -> DataReport:
    """The report on the config's own train and test sets."""
    train, test = load_source(data)
    return check_sets(train, test, threads, progress)


def check_sets(
    train: ImageSet, test: ImageSet, threads: int = 4, progress: bool = True
) -> DataReport:
    splits = {"train": train, "test": test}
    facts: dict[str, list[ImageFacts]] = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, images in splits.items():
            it = pool.map(lambda i, images=images: _facts(images, i), range(len(images)))
            bar = tqdm(it, total=len(images), desc=f"check {name}", disable=not progress)
            facts[name] = list(bar)

    def label(split: str, i: int) -> str:
        path = file_path(splits[split], i)
        return str(path) if path is not None else splits[split].image_id(i)

    report = DataReport(
        classes=list(train.class_names),
        counts={s: im.class_counts() for s, im in splits.items()},
        sizes={},
        modes={},
    )
    where: dict[str, list[tuple[str, int]]] = defaultdict(list)  # digest -> (split, index)
    for split, fs in facts.items():
        sizes = [f.size for f in fs if f.size is not None]  # the readable ones
        ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
        report.sizes[split] = {
            "min": [min(ws, default=0), min(hs, default=0)],
            "max": [max(ws, default=0), max(hs, default=0)],
        }
        report.modes[split] = dict(Counter(f.mode for f in fs if f.mode is not None))
        for i, f in enumerate(fs):
            if f.error is not None:
                report.unreadable.append(
                    {"split": split, "image": label(split, i), "reason": f.error}
                )
            elif f.sha256 is not None:
                where[f.sha256].append((split, i))
    report.empty_classes = [
        report.classes[k] for k, n in enumerate(report.counts["train"]) if n == 0
    ]
    for copies in where.values():
        if len(copies) < 2:
            continue
        if len({splits[s].labels[i] for s, i in copies}) > 1:
            report.conflicts.append(
                {
                    "images": [label(s, i) for s, i in copies],
                    "classes": [splits[s].class_names[splits[s].labels[i]] for s, i in copies],
                }
            )
            continue
        in_train = [label(s, i) for s, i in copies if s == "train"]
        in_test = [label(s, i) for s, i in copies if s == "test"]
        report.leaks.extend({"test": t, "train": in_train[0]} for t in in_test if in_train)
        for split, names in (("train", in_train), ("test", in_test)):
            if len(names) > 1:
                report.duplicates[split] = report.duplicates.get(split, 0) + len(names) - 1
    return report
