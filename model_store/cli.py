"""``python -m model_store``: list, show, verify, promote, history, remove, import-reference.

Every verb takes ``--root`` (default: $PROTOPNET_STORE, else ./store). Errors print one
line naming the bad value and the valid choices, and exit with status 1 (2 for a
malformed command line, as argparse does).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_store import gate
from model_store.errors import IntegrityError
from model_store.store import ModelStore
from protopnet.backbones import list_backbones
from protopnet.config import Preprocessing
from protopnet.errors import ProtoPNetError


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2))


def cmd_list(store: ModelStore, args: argparse.Namespace) -> int:
    entries = store.list()
    if args.json:
        _print(
            [{"name": e.name, "versions": e.versions, "aliases": e.aliases} for e in entries], True
        )
        return 0
    if not entries:
        print(f"no models in {store.root}")
        return 0
    for e in entries:
        print(e.name)
        for v in e.versions:
            tags = sorted(a for a, t in e.aliases.items() if t == v)
            print(f"  {v}" + (f"  ({', '.join(tags)})" if tags else ""))
    return 0


def cmd_show(store: ModelStore, args: argparse.Namespace) -> int:
    info = store.describe(args.ref)
    if args.json:
        _print(info, True)
        return 0
    arch = info["architecture"]
    metrics = {k: v for k, v in info["metrics"].items() if v is not None}
    print(f"{info['ref']}  aliases: {', '.join(info['aliases']) or '-'}")
    print(f"  created      {info['created_at']}  ({info['source']}, code {info['code_version']})")
    if info["kind"] == "drumond":
        print(
            f"  architecture Drumond soft-max prototypes on {arch['backbone']} "
            f"({'fine-tuned' if arch['train_trunk'] else 'frozen'}), "
            f"{arch['penalty'].upper()} alpha={arch['alpha']:g}, {arch['img_size']} px"
        )
    else:
        print(
            f"  architecture {arch['backbone']}, {arch['add_on']} add-on, "
            f"D={arch['prototype_depth']}, prototype {arch['prototype_size'][0]}x"
            f"{arch['prototype_size'][1]}, {arch['activation']} activation, {arch['img_size']} px"
        )
    classes = info["class_names"]
    shown = ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
    print(f"  classes      {info['num_classes']}: {shown}")
    print(
        f"  prototypes   {info['num_prototypes']} ({info['pruned_prototypes']} pruned, "
        f"{info['prototypes_with_images']} with images)"
    )
    print(f"  metrics      {json.dumps(metrics) if metrics else '-'}")
    print(f"  files        {info['files']}, {info['bytes'] / 1e6:.1f} MB in {info['path']}")
    return 0


def cmd_verify(store: ModelStore, args: argparse.Namespace) -> int:
    every = [f"{e.name}@{v}" for e in store.list() for v in e.versions]
    refs = [args.ref] if args.ref else every
    failed = 0
    for ref in refs:
        try:
            m = store.verify(ref)
        except IntegrityError as exc:
            failed += 1
            print(f"FAILED {ref}: {exc}", file=sys.stderr)
        else:
            print(f"ok {m.name}@{m.version} ({len(m.files) + 2} files)")
    if not refs:
        print(f"no models in {store.root}")
    return 1 if failed else 0


def cmd_promote(store: ModelStore, args: argparse.Namespace) -> int:
    """Move an alias, through the promotion gate (``model_store.gate``) when it already
    points at another version: refused (exit 1, the comparison printed) if the candidate
    is worse by more than the tolerance, unless ``--force``."""
    done = gate.promote(store, args.name, args.target, args.alias, args.tolerance, args.force)
    if done.rows:
        print(
            gate.table(
                done.rows, f"{args.alias}={done.previous}", f"cand.={done.candidate}",
                args.tolerance,
            )
        )  # fmt: skip
    if not done.promoted:
        print(f"refused: {done.refusal().replace('force promotes', '--force promotes')}",
              file=sys.stderr)  # fmt: skip
        return 1
    forced = f" (forced past: {', '.join(done.failed)})" if done.forced else ""
    print(f"{args.name}@{args.alias} -> {done.candidate}{forced}")
    return 0


def cmd_history(store: ModelStore, args: argparse.Namespace) -> int:
    rows = store.alias_history(args.name)
    if args.json:
        _print(rows, True)
        return 0
    for r in rows:
        forced = f"  FORCED past {', '.join(r['failed'])}" if r.get("forced") else ""
        print(
            f"{r['at']}  {r['alias']}: {r['previous'] or '-'} -> {r['version']}  "
            f"by {r['by']}{forced}"
        )
    if not rows:
        print(f"no alias moves recorded for {args.name}")
    return 0


def cmd_remove(store: ModelStore, args: argparse.Namespace) -> int:
    moved = store.remove(args.name, args.version, force=args.force)
    print(f"removed {args.name}@{args.version}")
    left = store.aliases(args.name) if args.name in store.names() else {}
    for a in moved:
        print(f"  alias {a}: " + (f"now {left[a]}" if a in left else "removed"))
    return 0


def cmd_import(store: ModelStore, args: argparse.Namespace) -> int:
    from model_store.importer import import_reference

    class_names: list[str] | None = None
    if args.class_names_file:
        lines = Path(args.class_names_file).read_text().splitlines()
        class_names = [ln.strip() for ln in lines if ln.strip()]
    elif args.class_names:
        class_names = [c.strip() for c in args.class_names.split(",")]
    prep = None
    if args.mean or args.std or args.resize != "stretch" or args.grayscale:
        from protopnet.backbones import get_backbone_spec

        spec = get_backbone_spec(args.backbone)
        try:
            prep = Preprocessing(
                img_size=args.img_size,
                resize=args.resize,
                mean=tuple(args.mean or spec.mean),
                std=tuple(args.std or spec.std),
                grayscale=args.grayscale,
            )
        except ValueError as exc:
            print(f"error: invalid preprocessing: {exc}", file=sys.stderr)
            return 1
    result = import_reference(
        store,
        args.weights,
        name=args.name,
        backbone=args.backbone,
        class_names=class_names,
        img_size=args.img_size,
        activation=args.activation,
        add_on=None if args.add_on == "auto" else args.add_on,
        epsilon=args.epsilon,
        preprocessing=prep,
        images_dir=args.images,
        batch_size=args.batch_size,
        trust_pickle=args.trust_pickle,
        reference_code=args.reference_code,
        aliases=args.alias or ["latest"],
        version=args.version,
        progress=not args.quiet,
    )
    m = result.manifest
    P = len(m.prototypes)
    print(f"imported {args.weights} as {m.name}@{m.version} ({P} prototypes)")
    if result.without_images:
        why = (
            "no --images folder given"
            if args.images is None
            else "their classes have no image in the folder"
        )
        print(
            f"  {len(result.without_images)} of {P} prototypes have no pictures ({why}): "
            f"{result.without_images[:20]}{' ...' if len(result.without_images) > 20 else ''}"
        )
    else:
        print(f"  pictures for all {P} prototypes from {result.images_seen} images")
    if m.familiarity is not None:
        f = m.familiarity
        print(
            f"  familiarity calibrated: fitted on {f.fitted_images} images, calibrated on "
            f"{f.calibration_images}"
        )
    else:
        print(f"  no familiarity score (answers say familiar: null): {result.familiarity_skipped}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model_store", description="Versioned, verifiable ProtoPNet artifacts."
    )
    p.add_argument("--root", help="store directory (default: $PROTOPNET_STORE, else ./store)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("list", help="every model with its versions and aliases")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("show", help="one version's manifest summary")
    s.add_argument("ref", help="name, name@version or name@alias")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_show)

    s = sub.add_parser("verify", help="check every file's SHA-256 (all versions without REF)")
    s.add_argument("ref", nargs="?")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser(
        "promote",
        help="point an alias at a version (creates or moves it); refused if the version is "
        "worse than the alias's current one on accuracy or prototype quality",
    )
    s.add_argument("name")
    s.add_argument("target", help="a version or an existing alias")
    s.add_argument("alias")
    s.add_argument(
        "--tolerance",
        type=float,
        default=gate.TOLERANCE,
        help=f"how much worse a figure (a share in 0..1) may be (default {gate.TOLERANCE})",
    )
    s.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    s.set_defaults(fn=cmd_promote)

    s = sub.add_parser("history", help="every alias move of a model, oldest first")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_history)

    s = sub.add_parser("remove", help="delete one version")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--force", action="store_true", help="also drop aliases pinned to it")
    s.set_defaults(fn=cmd_remove)

    s = sub.add_parser(
        "import-reference", help="publish a reference ProtoPNet state_dict as a version"
    )
    s.add_argument("weights", help=".pth/.pt state_dict or .safetensors")
    s.add_argument("--name", required=True)
    s.add_argument("--backbone", required=True, choices=list_backbones(), metavar="BACKBONE")
    s.add_argument("--class-names", help="comma-separated, in class-index order")
    s.add_argument("--class-names-file", help="one class name a line, in class-index order")
    s.add_argument("--img-size", type=int, default=224)
    s.add_argument("--activation", choices=["log", "linear"], default="log")
    s.add_argument("--add-on", choices=["auto", "regular", "bottleneck"], default="auto")
    s.add_argument("--epsilon", type=float, default=1e-4)
    s.add_argument("--resize", choices=["stretch", "center_crop", "pad"], default="stretch")
    s.add_argument("--mean", type=float, nargs=3, help="default: the trunk's")
    s.add_argument("--std", type=float, nargs=3, help="default: the trunk's")
    s.add_argument("--grayscale", action="store_true")
    s.add_argument("--images", help="training folder <class>/<image> for the prototypes' pictures")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--alias", action="append", help="aliases to set (default: latest)")
    s.add_argument("--version", help="explicit version (default: the next number)")
    s.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a whole-model pickle: RUNS CODE from the file; only for trusted files",
    )
    s.add_argument("--reference-code", help="folder of the reference code, for --trust-pickle")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_import)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = ModelStore(args.root)
    try:
        return int(args.fn(store, args))
    except (ProtoPNetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
