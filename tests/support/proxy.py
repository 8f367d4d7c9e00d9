"""Debian's nginx in front of service replicas on loopback, with the deployment's own
configuration (deploy/nginx/protopnet.conf.template) filled in as compose fills it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.servers import REPO, free_port

TEMPLATE = REPO / "deploy" / "nginx" / "protopnet.conf.template"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_available() -> bool:
    return Path(NGINX).exists()


def render(upstreams: list[str], listen: str) -> str:
    """The template with its two variables set, as the official image's envsubst would."""
    servers = "\n    ".join(f"server {u} max_fails=1 fail_timeout=5s;" for u in upstreams)
    return (
        TEMPLATE.read_text()
        .replace("${PROTOPNET_UPSTREAMS}", servers)
        .replace("${PROTOPNET_PROXY_LISTEN}", listen)
    )


@dataclass
class NginxProcess:
    port: int
    proc: subprocess.Popen
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_nginx(tmp: Path, upstreams: list[str]) -> NginxProcess:
    """nginx in the foreground, its files under ``tmp``, proxying to ``upstreams``."""
    prefix = tmp / "nginx"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    port = free_port()
    site = render(upstreams, f"127.0.0.1:{port}")
    conf = prefix / "nginx.conf"
    conf.write_text(
        "worker_processes 1;\n"
        f"pid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/logs/error.log warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"  access_log {prefix}/logs/access.log;\n"
        f"  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;\n"
        f"  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi;"
        f" scgi_temp_path {prefix}/scgi;\n"
        f"{site}\n"
        "}\n"
    )
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=(prefix / "logs" / "stderr.log").open("wb"),
    )
    server = NginxProcess(port, proc, prefix)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((prefix / "logs" / "stderr.log").read_text())
        try:
            if httpx.get(server.url + "/proxy-healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("nginx did not start")
