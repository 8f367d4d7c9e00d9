"""A separate process that publishes tiny models, for the concurrency and crash tests.

    python -m tests.model_store.publish_worker ROOT NAME SEED [--forever] [--go FILE]

Prints the published version of each publish on its own line. ``--go FILE`` waits until
FILE exists, so that several workers start publishing at the same moment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from model_store import ModelStore

from .conftest import publish_tiny


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    root, name, seed = argv[0], argv[1], int(argv[2])
    store = ModelStore(root)
    if "--go" in argv:
        go = Path(argv[argv.index("--go") + 1])
        print("ready", flush=True)
        while not go.exists():
            time.sleep(0.002)
    while True:
        _, manifest = publish_tiny(store, name=name, seed=seed)
        print(manifest.version, flush=True)
        if "--forever" not in argv:
            return


if __name__ == "__main__":
    main(sys.argv[1:])
