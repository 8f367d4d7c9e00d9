"""The printable report page: one self-contained HTML file, every image a data: URI."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape

from model_store.manifest import ClassMetrics, Interpretability, Metrics
from model_store.store import ImageKind
from service import render
from service.schemas import DrumondExplainResponse, ExplainResponse, FaithfulnessReceipt

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE_ENV = Environment(
    loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]), auto_reload=False
)


# The report (and the model card) is one self-contained page: its pictures are data: URIs and its style is
# inline; it runs no script and fetches nothing, so the browser is told to allow nothing
# else (labels come from training folders' names; the template escapes them as well).
REPORT_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

THUMB_SIDE = 240  # px; rows show 7rem images, this keeps print sharp and pages small


def data_uri(image: np.ndarray) -> str:
    """An RGB array as an inline JPEG (photos and crops: a fraction of a PNG's size)."""
    jpeg = render.encode_jpeg(np.ascontiguousarray(image), quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """Shrink (never enlarge) so the longer side is at most ``side`` pixels."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    s = side / max(h, w)
    return cv2.resize(
        image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
    )


def png_thumbnail(png: bytes) -> np.ndarray | None:
    """A store PNG as an RGB array, shrunk for the page when it is large."""
    arr = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        return None
    return thumbnail(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB))


@dataclass
class ReportRow:
    """One row of the paper's figure 3: this part of the image (crop), where on the
    image (activation), looks like that (prototype patch), from this training image
    (source, its box drawn); similarity x weight = points."""

    prototype: int
    similarity: float
    weight: float
    points: float
    crop_uri: str | None
    activation_uri: str | None
    patch_uri: str | None
    source_uri: str | None
    map_method: str = "upsample"  # what made the activation map and the box
    receipt: FaithfulnessReceipt | None = None  # explained with faithfulness=true
    flags: list[str] = field(default_factory=list)  # the prototype's quality warnings


@dataclass
class ReportSheet:
    title: str
    label: str
    probability: float
    rows: list[ReportRow]
    shown_total: float
    hidden_rows: int
    hidden_total: float
    other_prototypes: int
    other_total: float
    total: float


def class_record(metrics: Metrics | None, class_index: int) -> ClassMetrics | None:
    """The published test figures of ``class_index``, or None when the version has none
    (published before they were measured) or the class had no test image."""
    per_class = metrics.test_per_class if metrics is not None else None
    if not per_class or class_index >= len(per_class):
        return None
    c = per_class[class_index]
    return c if c.recall is not None else None


def render_report(
    resp: ExplainResponse,
    rd: render.RenderData,
    image: np.ndarray,
    store_picture: Callable[[int, ImageKind], bytes | None] | None,
    rows_per_class: int,
    metrics: Metrics | None = None,
    interpretability: Interpretability | None = None,
) -> str:
    """HTML for the predicted class and the runner-up. ``store_picture(j, kind)`` reads
    prototype j's "patch" or "source" PNG from the store (None: the model's version has
    left the store, and the rows show no such pictures). ``metrics``: the version's
    published test figures, for a line on how often its answer was right there;
    ``interpretability``: its prototypes' quality figures, for each row's warnings and
    the footer."""
    probs = {c.class_index: c.probability for c in resp.top_classes}
    quality = {q.index: q for q in interpretability.per_prototype} if interpretability else {}

    def flags(prototype: int) -> list[str]:
        q = quality.get(prototype)
        if q is None:
            return []
        out = []
        if q.off_object:
            out.append("its training patch misses the labelled object part")
        elif q.background:
            out.append("its training patch is flat background, not part of an object")
        if q.duplicate_of is not None:
            out.append(f"a duplicate of prototype {q.duplicate_of} (the same training patch)")
        return out

    def store_uri(prototype: int, kind: ImageKind) -> str | None:
        png = store_picture(prototype, kind) if store_picture is not None else None
        arr = png_thumbnail(png) if png else None
        return data_uri(arr) if arr is not None else None

    receipt_of = {p.prototype: p.receipt for p in resp.prototypes}
    method_of = {p.prototype: p.map_method for p in resp.prototypes}
    sheets = []
    for title, sheet in zip(
        ("Predicted class", "Runner-up"), resp.scoring_sheets[:2], strict=False
    ):
        rows = []
        for r in sheet.rows[:rows_per_class]:
            crop_uri = activation_uri = None
            if r.prototype in rd.shown:
                box = render.box_crop(rd, image, r.prototype)
                if box.size:
                    crop_uri = data_uri(thumbnail(box))
                activation_uri = data_uri(
                    thumbnail(render.activation_image(rd, image, r.prototype))
                )
            rows.append(
                ReportRow(
                    prototype=r.prototype,
                    similarity=r.similarity,
                    weight=r.weight,
                    points=r.points,
                    crop_uri=crop_uri,
                    activation_uri=activation_uri,
                    map_method=method_of.get(r.prototype, "upsample"),
                    patch_uri=store_uri(r.prototype, "patch"),
                    source_uri=store_uri(r.prototype, "source"),
                    receipt=receipt_of.get(r.prototype),
                    flags=flags(r.prototype),
                )
            )
        shown_total = sum(r.points for r in sheet.rows[:rows_per_class])
        sheets.append(
            ReportSheet(
                title=title,
                label=sheet.label,
                probability=probs.get(sheet.class_index, 0.0),
                rows=rows,
                shown_total=shown_total,
                hidden_rows=max(0, len(sheet.rows) - rows_per_class),
                hidden_total=sheet.own_total - shown_total,
                other_prototypes=sheet.other_prototypes,
                other_total=sheet.other_total,
                total=sheet.total,
            )
        )
    runner_up = resp.top_classes[1] if len(resp.top_classes) > 1 else None
    return TEMPLATE_ENV.get_template("report.html").render(
        explanation_id=resp.id,
        model=resp.model,
        image=resp.image,
        prediction=resp.prediction,
        familiarity=resp.familiarity,
        runner_up=runner_up,
        missing_runner_up=runner_up is None,
        sheets=sheets,
        tested=class_record(metrics, resp.prediction.class_index),
        test_accuracy=metrics.test_accuracy if metrics is not None else None,
        quality=interpretability,
        boxes_uri=data_uri(render.boxes_image(rd, image)),
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


@dataclass
class DrumondRow:
    """One prototype a Drumond model matched, in words and pictures."""

    prototype: int
    q: float
    strip_uri: str | None  # its nearest training images side by side
    nearest_labels: str
    neighbourhood: str  # e.g. "80% Coat, 20% Pullover"
    images: int
    weight: float  # its vote for the answered class


def render_drumond_report(
    resp: DrumondExplainResponse,
    image: np.ndarray,
    nearest_png: Callable[[int], bytes | None] | None,
    metrics: Metrics | None = None,
) -> str:
    """HTML for a Drumond model's explanation; ``nearest_png(j)`` reads prototype j's
    strip of nearest training images from the store (None: the version left it)."""
    answered = resp.prediction.class_index
    rows = []
    for p in resp.prototypes:
        png = nearest_png(p.prototype) if nearest_png is not None else None
        strip = None
        if png:
            arr = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_COLOR)
            strip = None if arr is None else data_uri(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB))
        rows.append(
            DrumondRow(
                prototype=p.prototype,
                q=p.q,
                strip_uri=strip,
                nearest_labels=", ".join(n.label for n in p.nearest),
                neighbourhood=", ".join(
                    f"{c.share * 100:.0f}% {c.label}" for c in p.neighbourhood[:3]
                ),
                images=p.neighbourhood_images,
                weight=p.class_weights[answered].weight,
            )
        )
    return TEMPLATE_ENV.get_template("drumond_report.html").render(
        explanation_id=resp.id,
        model=resp.model,
        image=resp.image,
        image_uri=data_uri(thumbnail(image, 2 * THUMB_SIDE)),
        prediction=resp.prediction,
        runner_up=resp.top_classes[1] if len(resp.top_classes) > 1 else None,
        ambiguity=resp.ambiguity,
        tested=class_record(metrics, answered),
        rows=rows,
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
