"""``python -m training <verb>``: check, train, evaluate, push, prune, export, ensemble,
synthetic, demo.

    python -m training check --config my.yaml [--json report.json] [--strict]
    python -m training train --config fashion_mnist [--set train.epochs=3] [--resume]
    python -m training evaluate --run-dir runs/fashion [--checkpoint best] [--split test]
    python -m training push --run-dir runs/fashion --checkpoint last
    python -m training prune --run-dir runs/fashion [--k 6 --tau 3]
    python -m training export --run-dir runs/fashion [--name fashion] [--store store]
    python -m training ensemble --run-dir runs/a --run-dir runs/b
    python -m training synthetic --out data/parts
    python -m training demo [--host 127.0.0.1 --port 8000]

Errors the user can fix (a bad config key, a missing dataset, a run directory that
exists) print one clear message and exit with status 2; nothing is half written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from protokit.devices import pick_device
from protopnet.errors import ProtoPNetError


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--config",
        required=required,
        help="YAML file, or the name of a shipped config (fashion_mnist, synthetic, cub_vgg19, ...)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train, push, prune, evaluate and export ProtoPNets.",
        epilog="Example: python -m training train --config fashion_mnist --set train.epochs=3",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser(
        "check",
        help="read every image of a config's dataset and report what would spoil training: "
        "unreadable files, images in two classes, test images also in train",
    )
    _config_args(p)
    p.add_argument("--json", type=Path, help="also write the whole report here")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))

    p = verbs.add_parser("train", help="train a ProtoPNet (warm-up, joint, push, last layer)")
    _config_args(p, required=False)
    p.add_argument("--run-dir", type=Path, help="default: <runs_dir>/<name> from the config")
    p.add_argument("--resume", action="store_true", help="continue a stopped run where it stopped")
    p.add_argument("--max-units", type=int, help="stop after this many stages (a stand-in kill)")
    p.add_argument("--export", action="store_true", help="publish to the model store when done")

    p = verbs.add_parser("evaluate", help="accuracy of a checkpoint on a split")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--checkpoint", default="best", help="best, last, pruned, pushed ...")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])

    p = verbs.add_parser(
        "push", help="project a checkpoint's prototypes and retrain the last layer"
    )
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--checkpoint", default="last")
    p.add_argument("--out", default="pushed", help="tag of the checkpoint written")
    p.add_argument("--last-layer-epochs", type=int, help="default: the config's")

    p = verbs.add_parser(
        "prune", help="prune prototypes (k nearest, tau) and retrain the last layer"
    )
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--out", default="pruned")
    p.add_argument("--k", type=int)
    p.add_argument("--tau", type=int)

    p = verbs.add_parser("export", help="publish a checkpoint to the model store")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--checkpoint", help="default: the config's export.checkpoint")
    p.add_argument("--name", help="model name in the store (default: the config's)")
    p.add_argument("--store", type=Path, help="store root (default: $PROTOPNET_STORE or ./store)")
    p.add_argument("--alias", action="append", help="aliases to point at it (repeatable)")

    p = verbs.add_parser(
        "revise",
        help="remove prototypes from a published model, refit its last layer, publish the "
        "result as a new version with its lineage",
    )
    p.add_argument("--model", required=True, help="NAME@VERSION (or an alias) in the store")
    p.add_argument(
        "--remove", required=True, help="prototype indices to remove, comma-separated: 12,40"
    )
    p.add_argument("--reason", help="why, recorded in the new version's lineage")
    p.add_argument("--name", help="publish under another name (default: the same)")
    p.add_argument("--store", type=Path, help="store root (default: $PROTOPNET_STORE or ./store)")
    p.add_argument(
        "--alias", action="append", help="aliases to point at it (repeatable; default: latest)"
    )
    p.add_argument("--by", help="who asked, for the lineage (default: the user running it)")

    p = verbs.add_parser("ensemble", help="test accuracy of several runs' summed logits")
    p.add_argument(
        "--run-dir",
        action="append",
        required=True,
        help="a run directory, optionally DIR:TAG (repeatable; the first one's test split is used)",
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])

    p = verbs.add_parser("synthetic", help="write the synthetic parts dataset as image folders")
    p.add_argument("--out", type=Path, required=True)
    _config_args(p, required=False)

    p = verbs.add_parser("demo", help="train the Fashion-MNIST demo model if needed, then serve it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", type=Path, help="store root (default: $PROTOPNET_STORE or ./store)")
    p.add_argument("--retrain", action="store_true", help="train even if the store has the model")
    p.add_argument("--no-serve", action="store_true", help="stop after publishing")
    return parser


def _print(obj: Any) -> None:
    """JSON on stdout, without confusion matrices (K x K numbers, one a line: 40000 lines
    for CUB); run directories' summary.json and the store's manifest keep them."""

    def brief(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: brief(v) for k, v in o.items() if not k.endswith("confusion")}
        return o

    print(json.dumps(brief(obj), indent=1, default=str))


def cmd_check(args: argparse.Namespace) -> int:
    from training.check import check_dataset
    from training.config import load_config

    cfg = load_config(args.config, args.overrides)
    report = check_dataset(cfg.data, args.threads, progress=not args.no_progress)
    for line in report.lines():
        print(line)
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1))
    failed = report.errors > 0 or (args.strict and report.warnings > 0)
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config, load_raw, validate_config
    from training.distributed import init_distributed, shutdown
    from training.run import Trainer

    if args.config is None:
        if not (args.resume and args.run_dir):
            raise SystemExit("train: give --config (or --resume with --run-dir)")
        path = args.run_dir / "config.yaml"
        if not path.is_file():
            raise SystemExit(f"train: {path} does not exist; give --config")
        from training.config import apply_overrides

        cfg = validate_config(apply_overrides(load_raw(path), args.overrides), str(path))
    else:
        cfg = load_config(args.config, args.overrides)
    if cfg.model.kind == "drumond":
        return _train_drumond(cfg, args)
    import torch

    # Without touching a GPU: each process takes its own in init_distributed, and
    # asking for the current device here would open a context on GPU 0 in every one.
    dist = init_distributed(cuda=cfg.train.device != "cpu" and torch.cuda.is_available())
    try:
        trainer = Trainer(cfg, args.run_dir, progress=not args.no_progress, dist=dist)
        summary = trainer.run(resume=args.resume, max_units=args.max_units)
    finally:
        shutdown(dist)
    if dist.is_main:
        if args.export and "best" in summary:
            from training.export import export_run

            manifest = export_run(trainer.run_dir)
            summary["published"] = f"{manifest.name}@{manifest.version}"
        _print(summary)
    return 0


def _train_drumond(cfg: Any, args: argparse.Namespace) -> int:
    """``train`` for ``model.kind: drumond`` (one process; see training.drumond)."""
    from training.drumond import DrumondTrainer, export_drumond

    trainer = DrumondTrainer(cfg, args.run_dir, progress=not args.no_progress)
    summary = trainer.run(resume=args.resume, max_units=args.max_units)
    if args.export and "best" in summary:
        manifest = export_drumond(trainer.run_dir)
        summary["published"] = f"{manifest.name}@{manifest.version}"
    _print(summary)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training import engine
    from training.data import build_splits
    from training.run import eval_loader, read_checkpoint

    ck = read_checkpoint(args.run_dir, args.checkpoint)
    splits = build_splits(ck.config.data, ck.config.train.seed)
    images = getattr(splits, args.split)
    device = pick_device(ck.config.train.device, "train.device")
    out = engine.evaluate(
        ck.model.to(device),
        eval_loader(images, ck.preprocessing, ck.config),
        ck.config.train.loss,
        device,
        progress=not args.no_progress,
        confusion=True,
    )
    _print(
        {
            "checkpoint": args.checkpoint,
            "split": args.split,
            **out,
            **engine.class_report(out["confusion"], ck.class_names),
        }
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from training import engine
    from training.data import build_splits
    from training.push import push_prototypes
    from training.run import (
        class_weights_for,
        eval_loader,
        read_checkpoint,
        write_model_checkpoint,
    )

    ck = read_checkpoint(args.run_dir, args.checkpoint)
    cfg = ck.config
    splits = build_splits(cfg.data, cfg.train.seed)
    device = pick_device(cfg.train.device, "train.device")
    model = ck.model.to(device)
    result = push_prototypes(
        model,
        splits.train,
        ck.preprocessing,
        batch_size=cfg.train.push_batch_size,
        num_workers=cfg.data.num_workers,
        device=device,
        precision=cfg.train.push_precision,
        visualize=False,
        progress=not args.no_progress,
    )
    sims, labels = engine.collect_similarities(
        model, eval_loader(splits.train, ck.preprocessing, cfg), device
    )
    epochs = (
        cfg.train.last_layer_epochs if args.last_layer_epochs is None else args.last_layer_epochs
    )
    engine.train_last_layer(
        model, sims, labels, epochs, cfg.train.lr.last_layer, cfg.train.loss,
        cfg.train.last_layer_batch_size, seed=cfg.train.seed,
        class_weights=class_weights_for(cfg, splits, device),
    )  # fmt: skip
    val = engine.evaluate(
        model, eval_loader(splits.val, ck.preprocessing, cfg), cfg.train.loss, device
    )
    write_model_checkpoint(
        args.run_dir, args.out, model, cfg, ck.preprocessing, ck.class_names,
        result.records, result.activation_maps,
        extra={"epoch": ck.meta.get("epoch"), "val_accuracy": val["accuracy"]},
    )  # fmt: skip
    _print(
        {
            "checkpoint": args.out,
            "push_seconds": result.seconds,
            "prototypes_per_second": result.prototypes_per_second,
            "push_precision": result.precision,
            "val_accuracy": val["accuracy"],
        }
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from training.run import prune_checkpoint

    info = prune_checkpoint(
        args.run_dir,
        args.checkpoint,
        args.out,
        progress=not args.no_progress,
        k=args.k,
        tau=args.tau,
    )
    _print(info)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.drumond import export_drumond, is_drumond_run
    from training.export import export_run

    manifest: Any
    if is_drumond_run(args.run_dir, args.checkpoint or "best"):
        manifest = export_drumond(
            args.run_dir, args.checkpoint or "best", args.name, args.store, args.alias
        )
    else:
        manifest = export_run(args.run_dir, args.checkpoint, args.name, args.store, args.alias)
    _print(
        {
            "published": f"{manifest.name}@{manifest.version}",
            "prototypes": len(manifest.prototypes),
            "metrics": manifest.metrics.model_dump(),
        }
    )
    return 0


def cmd_revise(args: argparse.Namespace) -> int:
    from training.revise import ReviseError, revise

    try:
        remove = [int(v) for v in args.remove.split(",") if v.strip()]
    except ValueError:
        raise ReviseError(
            f"--remove takes prototype indices separated by commas (e.g. 12,40), got "
            f"{args.remove!r}"
        ) from None
    store = None if args.store is None else str(args.store)
    _print(
        revise(store, args.model, remove, args.reason, args.name, args.alias or ["latest"], args.by)
    )
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from training.ensemble import evaluate_ensemble

    members = []
    for spec in args.run_dir:
        d, _, tag = spec.partition(":")
        members.append((Path(d), tag or "best"))
    _print(evaluate_ensemble(members, split=args.split))
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from training.config import SyntheticConfig, load_config
    from training.synthetic import write_image_folder

    cfg = (
        load_config(args.config, args.overrides).data.synthetic
        if args.config
        else SyntheticConfig()
    )
    out = write_image_folder(cfg, args.out)
    _print({"written": str(out), "classes": cfg.num_classes})
    return 0


EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "ankle-boot.png"


def _wait_ready(url: str, proc: Any, timeout_s: float = 180.0) -> bool:
    """Poll /readyz until the service answers 200 (or the process dies). urllib, not an
    HTTP client package: the command needs only the runtime dependencies."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def _explain_example(url: str, ref: str) -> str | None:
    """POST the bundled example image (a raw image/png body); its explanation's id."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    if not EXAMPLE_IMAGE.is_file():
        return None
    query = urllib.parse.urlencode({"model": ref})
    req = urllib.request.Request(
        f"{url}/explain?{query}",
        data=EXAMPLE_IMAGE.read_bytes(),
        headers={"Content-Type": "image/png"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return str(json.loads(r.read())["id"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def cmd_demo(args: argparse.Namespace) -> int:
    """Train and publish the Fashion-MNIST demo model unless the store has it; serve it.

    The service runs as a child process (``python -m service``; training never imports
    it); once it is ready the bundled example is explained so the printed report link
    works at once.
    """
    import signal
    import subprocess

    from model_store import ModelStore
    from protopnet.errors import UnknownNameError
    from training.config import load_config
    from training.export import export_run
    from training.run import Trainer

    cfg = load_config("fashion_mnist")
    name = cfg.export.name or cfg.name
    ref = f"{name}@production"
    store_root = args.store or cfg.export.store or os.environ.get("PROTOPNET_STORE") or "store"
    store = ModelStore(store_root)
    try:
        have = not args.retrain and bool(store.resolve(ref))
    except (UnknownNameError, ProtoPNetError):
        have = False
    if not have:
        print(f"training the demo model ({ref} is not in {store_root})", flush=True)
        run_dir = cfg.runs_dir / cfg.name
        trainer = Trainer(cfg, run_dir, progress=not args.no_progress)
        trainer.run(resume=True)
        manifest = export_run(run_dir, store_root=store_root)
        print(f"published {manifest.name}@{manifest.version} to {store_root}", flush=True)
    else:
        print(f"reusing {ref} from {store_root}", flush=True)
    if args.no_serve:
        return 0
    env = {**os.environ, "PROTOPNET_STORE": str(store_root), "PROTOPNET_DEFAULT_MODEL": ref}
    cmd = [
        sys.executable, "-m", "service",
        "--host", args.host, "--port", str(args.port), "--store", str(store_root),
    ]  # fmt: skip
    url = f"http://{args.host}:{args.port}"
    print(f"serving {name} on {url}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    # Ctrl-C / SIGTERM reach the service, which finishes in-flight requests and exits.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: proc.send_signal(s))
    if _wait_ready(url, proc):
        example = _explain_example(url, ref)
        rel = os.path.relpath(EXAMPLE_IMAGE)
        lines = [
            "",
            f"  API docs:       {url}/docs",
            f"  models:         {url}/models",
            f"  try it:         curl -F image=@{rel} '{url}/explain?top_classes=3'",
        ]
        if example:
            lines.append(f"  example report: {url}/explanations/{example}/report")
        lines.append("  stop:           Ctrl-C")
        print("\n".join(lines) + "\n", flush=True)
    rc = proc.wait()
    return 0 if rc in (0, -signal.SIGINT, -signal.SIGTERM) else rc


COMMANDS = {
    "check": cmd_check,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "push": cmd_push,
    "prune": cmd_prune,
    "export": cmd_export,
    "revise": cmd_revise,
    "ensemble": cmd_ensemble,
    "synthetic": cmd_synthetic,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except ProtoPNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
