"""Are the prototypes any good, and can a bad model be mended? Consistency and stability
on the synthetic parts set; a confounded variant trained, its mark prototypes flagged
from the card's own figures and removed with ``revise``; the demo model's background
prototypes removed the same way; the cost of the figures at export.

    python -m bench.interpretability [--demo-run runs/fashion-mnist] [--no-demo]

Writes bench/results/interpretability.json. The confounded set draws a class-coloured
square on every training image (``data.synthetic.confound_mark``); its test images have
none, so a model that learned the mark loses accuracy there. A prototype is flagged
when its box holds the part on fewer than half its class's test images (``part_share``
on the card); each class keeps its best one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import device_name, write_result
from model_store import ModelStore

FLAG_PART_SHARE = 0.5
MARK = 6  # px, on the 32 px images


def _cli(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "training", "--no-progress", *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"training {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def _train(tmp: Path, name: str, *sets: str) -> tuple[Any, float]:
    t0 = time.perf_counter()
    over = [a for s in sets for a in ("--set", s)]
    _cli(
        "train", "--config", "synthetic", "--run-dir", str(tmp / name),
        "--set", f"export.store={tmp / 'store'}", "--set", f"export.name={name}", *over,
        "--export",
    )  # fmt: skip
    return ModelStore(tmp / "store").load(name).manifest, time.perf_counter() - t0


def _flag(m: Any) -> list[int]:
    """Prototypes whose box misses the part on most of their class's images, each class
    keeping its best."""
    rows = m.interpretability.per_prototype
    flagged = []
    for k in range(len(m.class_names)):
        mine = [r for r in rows if r.class_index == k and r.part_share is not None]
        bad = [r for r in mine if r.part_share < FLAG_PART_SHARE]
        if len(bad) == len(mine) and mine:
            bad.remove(max(mine, key=lambda r: r.part_share))
        flagged += [r.index for r in bad]
    return sorted(flagged)


def _parts(tmp: Path) -> dict[str, Any]:
    clean, clean_s = _train(tmp, "clean")
    confounded, conf_s = _train(tmp, "confounded", f"data.synthetic.confound_mark={MARK}")
    flagged = _flag(confounded)
    t0 = time.perf_counter()
    out = _cli(
        "revise", "--model", f"confounded@{confounded.version}", "--remove",
        ",".join(map(str, flagged)), "--reason", "on the confound mark, not the part",
        "--store", str(tmp / "store"),
    ) if flagged else {"test_accuracy_after": confounded.metrics.test_accuracy}  # fmt: skip
    revise_s = time.perf_counter() - t0
    a_clean, a_conf = clean.metrics.test_accuracy, confounded.metrics.test_accuracy
    a_rev = out["test_accuracy_after"]
    gap = a_clean - a_conf
    return {
        "consistency": clean.interpretability.consistency,
        "stability": clean.interpretability.stability,
        "clean_interpretability": clean.interpretability.model_dump(exclude={"per_prototype"}),
        "acc_clean": a_clean,
        "acc_confounded": a_conf,
        "confound_cost_points": round(100 * gap, 1),
        "flagged_prototypes": flagged,
        "confounded_part_share": [r.part_share for r in confounded.interpretability.per_prototype],
        "acc_revised": a_rev,
        "recovery": round((a_rev - a_conf) / gap, 3) if gap > 0 else None,
        "revise_minutes": round(revise_s / 60, 3),
        "train_minutes": round(conf_s / 60, 3),
        "train_minutes_clean": round(clean_s / 60, 3),
    }


def _demo(tmp: Path, run_dir: Path) -> dict[str, Any]:
    """Re-export the demo run (figures and global analysis), then remove its background
    prototypes with revise."""
    t0 = time.perf_counter()
    _cli("export", "--run-dir", str(run_dir), "--store", str(tmp / "demo"), "--name", "demo")
    export_s = time.perf_counter() - t0
    m = ModelStore(tmp / "demo").load("demo").manifest
    q = m.interpretability
    background = [r.index for r in q.per_prototype if r.background]
    out: dict[str, Any] = {
        "export_seconds_with_figures": round(export_s, 1),
        "interpretability": q.model_dump(exclude={"per_prototype"}),
        "background_prototypes": background,
        "acc_before": m.metrics.test_accuracy,
    }
    if background:
        t0 = time.perf_counter()
        r = _cli(
            "revise", "--model", "demo@1", "--remove", ",".join(map(str, background)),
            "--reason", "flat background", "--store", str(tmp / "demo"),
        )  # fmt: skip
        out.update(
            acc_after=r["test_accuracy_after"],
            accuracy_change_points=round(100 * (r["test_accuracy_after"] - out["acc_before"]), 2),
            revise_minutes=round((time.perf_counter() - t0) / 60, 3),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-run", type=Path, default=Path("runs/fashion-mnist"))
    p.add_argument("--no-demo", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-interp-") as d:
        tmp = Path(d)
        result: dict[str, Any] = {"device": device_name()}
        result.update(_parts(tmp))
        print({k: v for k, v in result.items() if k != "clean_interpretability"}, flush=True)
        if not args.no_demo and (args.demo_run / "checkpoints").is_dir():
            result["demo"] = _demo(tmp, args.demo_run)
            print(result["demo"], flush=True)
    path = write_result("interpretability", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
