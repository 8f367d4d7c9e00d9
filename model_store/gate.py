"""The promotion gate: may a candidate version take an alias from the version it points
at now? It may not if its test accuracy, or any of its prototypes' quality figures
(``Manifest.interpretability``), is worse by more than a tolerance.

Each figure is a share in [0, 1], so one tolerance (in points of 1, default 0.01: one
percentage point) reads the same for all of them. Higher is better for all but the share
of background prototypes. A figure either version lacks is shown and not judged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from model_store.manifest import AnyManifest, Interpretability
from model_store.store import ModelStore

TOLERANCE = 0.01


def _quality(m: AnyManifest) -> Interpretability | None:
    """The prototypes' quality figures (a Drumond version has none: not judged)."""
    return getattr(m, "interpretability", None)


def _share(count: Callable[[Interpretability], int]) -> Callable[[AnyManifest], float | None]:
    def of(m: AnyManifest) -> float | None:
        q = _quality(m)
        return None if q is None or q.prototypes == 0 else count(q) / q.prototypes

    return of


def _interp(field: str) -> Callable[[AnyManifest], float | None]:
    def of(m: AnyManifest) -> float | None:
        q = _quality(m)
        return None if q is None else getattr(q, field)

    return of


# (name, how to read it, higher is better)
FIGURES: tuple[tuple[str, Callable[[AnyManifest], float | None], bool], ...] = (
    ("test_accuracy", lambda m: m.metrics.test_accuracy, True),
    ("test_balanced_accuracy", lambda m: m.metrics.test_balanced_accuracy, True),
    ("unique_share", _share(lambda q: q.unique_prototypes), True),
    ("background_share", _share(lambda q: q.background_prototypes), False),
    ("sparsity", _interp("sparsity"), True),
    ("stability", _interp("stability"), True),
    ("consistency", _interp("consistency"), True),
)


@dataclass(frozen=True)
class GateRow:
    figure: str
    current: float | None
    candidate: float | None
    higher_is_better: bool
    worse_by: float | None  # None: not judged (a side lacks it)
    passed: bool


def compare(
    current: AnyManifest, candidate: AnyManifest, tolerance: float = TOLERANCE
) -> list[GateRow]:
    """One row per figure; a row fails when the candidate is worse by more than
    ``tolerance``."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    rows = []
    for name, read, higher in FIGURES:
        a, b = read(current), read(candidate)
        worse = None if a is None or b is None else (a - b if higher else b - a)
        rows.append(GateRow(name, a, b, higher, worse, worse is None or worse <= tolerance))
    return rows


def table(rows: list[GateRow], current: str, candidate: str, tolerance: float) -> str:
    """The comparison as a fixed-width table a person reads in a terminal."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    head = f"{'figure':24s} {current:>14s} {candidate:>14s} {'change':>8s}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        change = (
            "-" if r.current is None or r.candidate is None else f"{r.candidate - r.current:+.4f}"
        )
        verdict = (
            "not measured on both"
            if r.worse_by is None
            else "ok"
            if r.passed
            else f"WORSE by {r.worse_by:.4f} (> {tolerance:g})"
        )
        lines.append(
            f"{r.figure:24s} {f(r.current):>14s} {f(r.candidate):>14s} {change:>8s}  {verdict}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Promotion:
    """What the gate decided for one alias move (``promote``)."""

    name: str
    alias: str
    candidate: str  # the version asked for
    previous: str | None  # where the alias pointed before (None: a new alias)
    rows: list[GateRow]  # empty when nothing was compared (new alias, or same version)
    failed: list[str]  # the figures worse by more than the tolerance
    promoted: bool  # False: refused, the alias did not move
    tolerance: float

    @property
    def forced(self) -> bool:
        return self.promoted and bool(self.failed)

    def refusal(self) -> str:
        return (
            f"{self.name}@{self.candidate} is worse than {self.name}@{self.previous} on "
            f"{', '.join(self.failed)} by more than {self.tolerance:g}; {self.alias} stays "
            f"at {self.previous} (force promotes anyway, and the alias history records it)"
        )


def promote(
    store: ModelStore,
    name: str,
    target: str,
    alias: str,
    tolerance: float = TOLERANCE,
    force: bool = False,
    by: str | None = None,
) -> Promotion:
    """Move ``alias`` of ``name`` to ``target`` (a version or an alias) through the gate:
    when the alias already points at another version, the candidate is compared with
    it and the move is refused (``promoted`` False, nothing written) if any figure is
    worse by more than ``tolerance``, unless ``force``; ``by`` goes in the alias
    history. The command line and the HTTP route both call this."""
    candidate = store.verify(f"{name}@{target}")  # a damaged candidate is never promoted
    previous = store.aliases(name).get(alias)
    rows: list[GateRow] = []
    if previous is not None and previous != candidate.version:
        rows = compare(store.any_manifest(f"{name}@{previous}"), candidate, tolerance)
    failed = [r.figure for r in rows if not r.passed]
    decided = dict(
        name=name, alias=alias, candidate=candidate.version, previous=previous, rows=rows,
        failed=failed, tolerance=tolerance,
    )  # fmt: skip
    if failed and not force:
        return Promotion(**decided, promoted=False)  # type: ignore[arg-type]
    store.promote(name, candidate.version, alias, forced=bool(failed), failed=failed, by=by)
    return Promotion(**decided, promoted=True)  # type: ignore[arg-type]
