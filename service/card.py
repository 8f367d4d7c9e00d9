"""The model card: one self-contained HTML page about a model version for the person who
signs it off: what it is, how well it did, its prototypes' quality, and the global
explanation (for each class its prototypes, each with its training patch, its source
image with the box, and its nearest training patches), weak prototypes flagged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model_store.manifest import Manifest, PrototypeQuality
from service.report import TEMPLATE_ENV, data_uri, png_thumbnail

# A prototype is called weak when fewer than this share of its nearest training patches
# come from its own class (it matches other classes' images as well as its own), or when
# its box says something else under slight noise on more than half its class's images.
WEAK_NEAREST_OWN = 0.5
WEAK_STABILITY = 0.5


@dataclass
class CardPrototype:
    index: int
    patch_uri: str | None
    source_uri: str | None
    nearest_uri: str | None
    nearest_classes: list[str]
    stability: float | None
    part_share: float | None
    flags: list[str] = field(default_factory=list)


def flags_of(q: PrototypeQuality | None, class_names: list[str]) -> list[str]:
    """What a reviewer should know about one prototype, in words."""
    if q is None:
        return []
    out = []
    if q.duplicate_of is not None:
        out.append(f"duplicate of prototype {q.duplicate_of} (the same training patch)")
    if q.off_object:
        out.append("off the object: its training patch misses the labelled part")
    elif q.background:
        out.append("flat background: its training patch is not part of an object")
    if q.nearest_own_share is not None and q.nearest_own_share < WEAK_NEAREST_OWN:
        others = sorted({class_names[c] for c in q.nearest_classes if c != q.class_index})
        out.append(
            f"weak: {100 * (1 - q.nearest_own_share):.0f}% of its nearest training patches "
            f"are of other classes ({', '.join(others)})"
        )
    if q.stability is not None and q.stability < WEAK_STABILITY:
        out.append(
            f"unstable: under slight noise its box changes on {100 * (1 - q.stability):.0f}% "
            "of its class's images"
        )
    return out


def render_card(
    m: Manifest,
    aliases: list[str],
    picture: Callable[[int, str], bytes | None],
) -> str:
    """HTML for version ``m``; ``picture(j, kind)`` reads prototype j's "patch",
    "source" or "nearest" PNG from the store (None when absent)."""

    def uri(j: int, kind: str) -> str | None:
        png = picture(j, kind)
        arr = png_thumbnail(png) if png else None
        return data_uri(arr) if arr is not None else None

    q = m.interpretability
    quality = {r.index: r for r in q.per_prototype} if q is not None else {}
    classes: list[dict[str, Any]] = []
    per_class = {c.label: c for c in (m.metrics.test_per_class or [])}
    for k, label in enumerate(m.class_names):
        protos = []
        for p in m.prototypes:
            if p.class_index != k:
                continue
            row = quality.get(p.index)
            protos.append(
                CardPrototype(
                    index=p.index,
                    patch_uri=uri(p.index, "patch"),
                    source_uri=uri(p.index, "source"),
                    nearest_uri=uri(p.index, "nearest"),
                    nearest_classes=[m.class_names[c] for c in row.nearest_classes] if row else [],
                    stability=row.stability if row else None,
                    part_share=row.part_share if row else None,
                    flags=flags_of(row, m.class_names),
                )
            )
        classes.append({"label": label, "metrics": per_class.get(label), "prototypes": protos})
    data = m.training_config.get("data", {}) if isinstance(m.training_config, dict) else {}
    return TEMPLATE_ENV.get_template("card.html").render(
        m=m,
        aliases=aliases,
        data_kind=data.get("kind"),
        data_root=data.get("root"),
        quality=q,
        classes=classes,
        flagged=sum(1 for c in classes for p in c["prototypes"] if p.flags),
    )
