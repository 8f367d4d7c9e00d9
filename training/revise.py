"""Mend a published model without retraining it: remove prototypes a reviewer rejected
and refit the last layer without them (the convex last-layer stage on the training
split's similarity scores; the trunk, add-on layers and remaining prototypes do not
change, so neither do their pictures or the familiarity score). The result is evaluated,
its prototype quality measured, and published as a new version whose manifest records
its lineage (what it was derived from, what was removed, why, by whom, when).
"""

from __future__ import annotations

import getpass
import io
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image

from model_store import ModelStore
from model_store.manifest import Lineage, Manifest
from model_store.store import PrototypeVisuals
from protokit.devices import pick_device
from protopnet.errors import ProtoPNetError
from training.config import ConfigError, validate_config
from training.data import DatasetError, build_splits
from training.export import measure_interpretability
from training.prune import reindex_records
from training.run import metrics_from_test, refit_last_layer


class ReviseError(ProtoPNetError):
    """A revision that cannot be made; the message says why."""


def _visuals(loaded: Any, keep: Sequence[int]) -> dict[int, PrototypeVisuals]:
    """The kept prototypes' stored pictures, renumbered to their new rows."""
    out = {}
    for new, old in enumerate(keep):
        pics = [loaded.prototype_image_bytes(old, k) for k in ("patch", "source", "activation")]
        if all(p is not None for p in pics):
            arrays = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pics]  # type: ignore[arg-type]
            strip = loaded.nearest_image_bytes(old)
            near = (
                None if strip is None else np.asarray(Image.open(io.BytesIO(strip)).convert("RGB"))
            )
            patch, source, activation = arrays
            out[new] = PrototypeVisuals(patch, source, activation, nearest=near)
    return out


def check_removal(m: Manifest, remove: Sequence[int]) -> tuple[list[int], list[int]]:
    """What a revision of ``m`` removing ``remove`` would drop and keep, or a
    ``ReviseError`` saying why it cannot be made; reads only the manifest, so the service
    checks a request with it before starting the refit."""
    source = f"{m.name}@{m.version}"
    P = len(m.prototypes)
    drop = sorted(set(int(j) for j in remove))
    if not drop:
        raise ReviseError("nothing to remove: give --remove with prototype indices, e.g. 12,40")
    bad = [j for j in drop if not 0 <= j < P]
    if bad:
        raise ReviseError(
            f"unknown prototype {bad[0]}: {source} has prototypes 0..{P - 1}"
            + (f" ({len(bad)} unknown)" if len(bad) > 1 else "")
        )
    classes = [p.class_index for p in m.prototypes]
    keep = [j for j in range(P) if j not in set(drop)]
    emptied = sorted({classes[j] for j in drop} - {classes[j] for j in keep})
    if emptied:
        names = ", ".join(repr(m.class_names[k]) for k in emptied)
        raise ReviseError(
            f"removing {', '.join(map(str, drop))} leaves class {names} of {source} without "
            "prototypes: it could never be answered; keep at least one of its prototypes"
        )
    plain = {k: v for k, v in m.training_config.items() if k not in ("checkpoint", "run_dir")}
    if m.source != "training" or "data" not in plain:
        how = "imported" if m.source == "import-reference" else "published without them"
        raise ReviseError(
            f"{source} has no training configuration and data recorded ({how}): the last "
            "layer is refitted on the training split, so revise needs a model trained and "
            "exported by `python -m training`"
        )
    return drop, keep


def revise(
    store_root: str | None,
    ref: str,
    remove: Sequence[int],
    reason: str | None = None,
    name: str | None = None,
    aliases: Sequence[str] = ("latest",),
    by: str | None = None,
) -> dict[str, Any]:
    """Remove prototypes ``remove`` of ``ref`` (name@version), refit its last layer on the
    training split and publish the result; ``by`` (default: the user running it) goes in
    the lineage. Returns what was done, with the test accuracy before and after."""
    t0 = time.perf_counter()
    store = ModelStore(store_root)
    loaded = store.load(ref)
    m = loaded.manifest
    source = f"{m.name}@{m.version}"
    model = loaded.model
    P = model.num_prototypes
    drop, keep = check_removal(m, remove)
    plain = {k: v for k, v in m.training_config.items() if k not in ("checkpoint", "run_dir")}
    try:
        cfg = validate_config(plain, f"{source}'s training configuration")
        splits = build_splits(cfg.data, cfg.train.seed)
    except (ConfigError, DatasetError, OSError) as exc:
        raise ReviseError(f"the training data of {source} is not at hand: {exc}") from None
    device = pick_device(cfg.train.device, "train.device")
    model.to(device)
    prep = m.preprocessing
    model.prune_prototypes(drop)
    records, maps = reindex_records(m.prototypes, loaded.activation_maps(), drop)
    last, val, test = refit_last_layer(model, splits, prep, cfg, device)
    metrics = {
        "val_accuracy": None if val is None else val["accuracy"],
        **metrics_from_test(test, m.class_names),
    }
    visuals = _visuals(loaded, keep)
    old_rows = (
        {} if m.interpretability is None else {q.index: q for q in m.interpretability.per_prototype}
    )
    nearest = {
        new: old_rows[old].nearest_classes for new, old in enumerate(keep) if old in old_rows
    }
    interp = measure_interpretability(model, splits, prep, cfg, records, visuals, nearest)
    lineage = Lineage(
        derived_from=source,
        removed_prototypes=drop,
        reason=reason,
        by=by or getpass.getuser(),
        at=datetime.now(UTC),
        kept_prototypes=keep,
    )
    published = store.publish(
        name or m.name,
        model.cpu().eval(),
        prep,
        m.class_names,
        records,
        visuals=visuals,
        activation_maps=maps,
        training_config=m.training_config,
        metrics=metrics,
        aliases=tuple(aliases),
        familiarity=loaded.familiarity(),
        interpretability=interp,
        lineage=lineage,
    )
    return {
        "published": f"{published.name}@{published.version}",
        "derived_from": source,
        "removed": drop,
        "prototypes_before": P,
        "prototypes_after": len(keep),
        "test_accuracy_before": m.metrics.test_accuracy,
        "test_accuracy_after": metrics["test_accuracy"],
        "last_layer": last,
        "seconds": round(time.perf_counter() - t0, 1),
    }
