"""The deployment files agree with the code: every PROTOPNET_ variable the Dockerfile and
docker-compose.yml set is a setting the service reads (it ignores unknown ones, so a
typo would silently do nothing), and the compose defaults serve the model that
``make demo`` publishes."""

from __future__ import annotations

import os
import re
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
