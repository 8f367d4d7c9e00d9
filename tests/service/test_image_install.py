"""The Docker image's code serves. There is no Docker engine here, so this builds what the
image's Python would be: exactly the files the Dockerfile COPYs into /app, installed with
``pip install .`` (not the editable checkout), then run as the image's CMD,
``python -m service``, with nothing of the checkout importable. A module or template the
image leaves out, or a service import of ``training`` (not in the image), fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.corpus import encode
from tests.service.helpers import check_sheets, png_of, reference
from tests.support.servers import REPO, launch_server

pytestmark = pytest.mark.slow


def copy_like_dockerfile(dest: Path) -> list[str]:
    """Copy what the Dockerfile's COPY instructions put in its WORKDIR into ``dest``
    (directories as trees, without caches); returns the sources copied."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    copied: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY":
            continue
        assert not any(p.startswith("--") for p in parts[1:]), f"COPY flags: {line}"
        *sources, target = parts[1:]
        for pattern in sources:
            for src in sorted(REPO.glob(pattern)):
                if src.is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
                    shutil.copytree(src, dest / target, ignore=ignore)
                else:
                    out = dest / target / src.name if target.endswith("/") else dest / target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, out)
                copied.append(src.name)
    return copied


@pytest.fixture(scope="module")
def image_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install .`` of the image's files into a folder of its own."""
    tmp = tmp_path_factory.mktemp("image")
    app, site = tmp / "app", tmp / "site"
    copied = copy_like_dockerfile(app)
    assert {"pyproject.toml", "protopnet", "model_store", "service"} <= set(copied)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    done = subprocess.run(
        [*pip, "--no-build-isolation", "--no-compile", "--target", str(site), str(app)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return site


def image_python(site: Path) -> tuple[list[str], dict[str, str]]:
    """The interpreter as the image has it: ``-S`` keeps the checkout's editable install
    (a .pth file) out; the installed copy comes first, then the third-party packages:
    the interpreter's own, and those on this PYTHONPATH (where a machine keeps them
    there, as the GPU machines' wheels do) except the checkout itself."""
    deps = [sysconfig.get_paths()["purelib"]]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and Path(entry).resolve() != REPO.resolve():
            deps.append(entry)
    return [sys.executable, "-S"], {"PYTHONPATH": os.pathsep.join([str(site), *deps])}


def test_only_the_installed_copy_is_importable(image_site: Path, tmp_path: Path) -> None:
    """The check below would prove nothing if the checkout leaked in: here it does not."""
    python, env = image_python(image_site)
    probe = (
        "import importlib.util as u, service, protopnet, model_store; "
        "print(service.__file__, protopnet.__file__, model_store.__file__); "
        "print(u.find_spec('training'), u.find_spec('tests'))"
    )
    done = subprocess.run(
        [*python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    files, specs = done.stdout.splitlines()
    assert all(f.startswith(str(image_site)) for f in files.split()), files
    assert specs == "None None"
    templates = list((image_site / "service" / "templates").iterdir())
    assert templates, "the report page's templates were not installed"


def test_the_image_command_explains_and_reports(
    image_site: Path, tmp_path: Path, store_root: Path, photo_images
) -> None:
    python, env = image_python(image_site)
    workdir = tmp_path / "run"
    workdir.mkdir()
    server = launch_server(
        tmp_path, store_root, command=[*python, "-m", "service"], cwd=workdir, env_extra=env
    )
    try:
        server.wait()
        img = photo_images["cat"].rotate(3)  # no patch exactly a prototype (test_explain)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post(
                "/explain", content=encode(img, "PNG"), headers={"Content-Type": "image/png"}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            ref = reference(store_root, "photo", img)
            check_sheets(body, ref["logits"])
            assert body["prediction"]["class_index"] == int(np.argmax(ref["logits"]))
            shown = body["prototypes"][0]
            overlay = png_of(client, shown["heatmap"]["overlay"])
            display = body["image"]["display"]
            assert overlay.size == (display["width"], display["height"])
            page = client.get(body["links"]["report"])
            assert page.status_code == 200, page.text
            assert page.headers["content-type"].startswith("text/html")
            assert body["prediction"]["label"] in page.text
            assert page.text.count('src="data:image/') >= 2  # the pictures are inline
            bad = client.post(
                "/explain", content=b"not an image", headers={"Content-Type": "image/png"}
            )
            assert bad.status_code == 415 and "image" in bad.json()["error"]["message"]
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()
