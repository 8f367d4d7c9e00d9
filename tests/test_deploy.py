"""The deployment files agree with the code: every PROTOPNET_ variable the Dockerfile and
docker-compose.yml set is a setting the service reads (it ignores unknown ones, so a
typo would silently do nothing), and the compose defaults serve the model that
``make demo`` publishes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from training.config import load_config

REPO = Path(__file__).resolve().parents[1]
PREFIX = "PROTOPNET_"
_SUBST = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")  # ${VAR} or ${VAR:-default}


def compose_env() -> dict[str, str]:
    """The api service's environment with each ${VAR:-default} at its default."""
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = doc["services"]["api"]["environment"]
    return {k: _SUBST.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            out.update(re.findall(r"(\w+)=(\S+)", line))
    return out


def test_every_protopnet_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    for where, env in (("docker-compose.yml", compose_env()), ("Dockerfile", dockerfile_env())):
        names = [k for k in env if k.startswith(PREFIX)]
        assert names, f"{where} sets no {PREFIX} variable"
        unknown = [k for k in names if k[len(PREFIX) :].lower() not in fields]
        assert not unknown, f"{where} sets {unknown}, which the service ignores"


def test_compose_defaults_serve_the_demo_model(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(PREFIX):
            monkeypatch.delenv(k)
    for k, v in {**dockerfile_env(), **compose_env()}.items():
        if k.startswith(PREFIX):
            monkeypatch.setenv(k, v)
    s = Settings()
    demo = load_config("fashion_mnist")
    assert s.default_model == f"{demo.export.name or demo.name}@production"
    assert (str(s.store), s.redis_url, s.host, s.port) == (
        "/store",
        "redis://redis:6379/0",
        "0.0.0.0",
        8000,
    )
    assert s.models == [] and s.api_keys == [] and s.device == "auto"


def dockerfile_steps() -> list[tuple[str, str]]:
    """(instruction, rest) of each Dockerfile step, continuation lines joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            op, _, rest = line.strip().partition(" ")
            steps.append((op, rest))
    return steps


def test_dependencies_install_in_a_layer_only_pyproject_invalidates(tmp_path: Path) -> None:
    steps = dockerfile_steps()
    copies = [i for i, (op, _) in enumerate(steps) if op == "COPY"]
    installs = [i for i, (op, rest) in enumerate(steps) if op == "RUN" and "pip install" in rest]
    assert steps[copies[0]][1].split() == ["pyproject.toml", "./"]  # the first COPY alone
    deps_step, code_step = installs[0], installs[-1]
    assert copies[0] < deps_step < copies[1], "the dependencies install before the code"
    assert "--no-deps ." in steps[code_step][1], "the code's install must not reinstall torch"
    # The dependency step's own command lists exactly the project's runtime requirements.
    command = steps[deps_step][1].split(" && ")[0].strip()
    assert command.startswith("python3 -c ") and command.endswith("> /tmp/requirements.txt")
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    script = command.removeprefix("python3 -c ").removesuffix(" > /tmp/requirements.txt")
    out = subprocess.run(
        f"{sys.executable} -c {script}", shell=True, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    with open(REPO / "pyproject.toml", "rb") as f:
        wanted = tomllib.load(f)["project"]["dependencies"]
    assert out.stdout.split() == wanted
    assert not {"httpx", "pytest"} & {r.split(">")[0].split("=")[0] for r in wanted}


def test_compose_puts_the_tested_proxy_in_front_of_unpublished_replicas(tmp_path: Path) -> None:
    """Compose's nginx mounts the very template the loopback fail-over test runs, fills
    exactly its placeholders, and is the one published port; nginx accepts the file."""
    from tests.support.proxy import NGINX, TEMPLATE, nginx_available, render

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    proxy, api = services["proxy"], services["api"]
    assert "ports" not in api and proxy["ports"] == ["${PROXY_PORT:-8000}:8080"]
    mount = "./deploy/nginx/protopnet.conf.template:/etc/nginx/templates/default.conf.template:ro"
    assert mount in proxy["volumes"] and TEMPLATE == REPO / "deploy/nginx/protopnet.conf.template"
    placeholders = set(re.findall(r"\$\{(\w+)\}", TEMPLATE.read_text()))
    env = proxy["environment"]
    assert placeholders == {k for k in env if k.startswith("PROTOPNET_")}
    assert re.fullmatch(env["NGINX_ENVSUBST_FILTER"].strip("^") + r"\w*", "PROTOPNET_UPSTREAMS")
    if not nginx_available():
        pytest.skip("Debian's nginx is not installed")
    conf = tmp_path / "nginx.conf"
    site = render(["127.0.0.1:8001", "127.0.0.1:8002"], env["PROTOPNET_PROXY_LISTEN"])
    conf.write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{ access_log off; {site} }}\n"
    )
    out = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
