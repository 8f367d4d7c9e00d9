"""Faults a deployment meets, provoked on real processes: each scenario returns plain
observations (counts, statuses, log lines). tests/reliability/ asserts on them;
``python -m bench.faults`` records them in bench/results/faults.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx

from model_store import ModelStore
from tests.support.servers import REPO, RedisProcess, free_port
from tests.support.serving import (
    LoadRun,
    ModelSource,
    RequestImages,
    closed_loop,
    demo_architecture,
    metric_sum,
    publish_random,
    serve,
    wait_for,
)

SCENARIOS = ("redis", "sigterm", "corrupt", "training", "fuzz")


def _images(source: ModelSource) -> RequestImages:
    return RequestImages(ModelStore(source.store).manifest(source.ref).preprocessing)


def _phase(run: LoadRun, t0: float, t1: float) -> dict[str, Any]:
    """Requests sent in [t0, t1): count, anything but 200, p99 of the 200s."""
    part = LoadRun([s for s in run.samples if t0 <= s.start < t1], t0, t1)
    return {
        "requests": len(part.samples),
        "failed": len(part.failures()),
        "p99_ms": part.percentile_ms(99),
    }


def _failures(run: LoadRun, limit: int = 5) -> list[str]:
    return [f"{s.status} {s.error or ''}".strip() for s in run.failures()[:limit]]


# -- Redis killed and restarted under load --------------------------------------------


def redis_outage(
    tmp: Path,
    source: ModelSource,
    clients: int = 16,
    before_s: float = 4.0,
    down_s: float = 5.0,
    after_s: float = 5.0,
) -> dict[str, Any]:
    """Load for before+down+after seconds; Redis is killed after ``before_s`` and started
    again ``down_s`` later. Every request should still be answered 200."""
    images = _images(source)
    redis = RedisProcess(free_port())
    redis.start()
    server = serve(tmp, source, redis_url=redis.url, redis_retry_s=0.5)
    obs: dict[str, Any] = {"clients": clients, "down_s": down_s}
    try:

        async def scenario() -> tuple[LoadRun, float, float, list[str]]:
            total = before_s + down_s + after_s
            load = asyncio.create_task(closed_loop(server.url, images, clients, total))
            await asyncio.sleep(before_s)
            obs["explanations_in_redis_before_kill"] = len(redis.client().keys("protopnet:exp:*"))
            t_down = time.monotonic()
            await asyncio.to_thread(redis.stop)
            seen: list[str] = []  # /readyz statuses while Redis is down
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                while time.monotonic() < t_down + down_s:
                    seen.append((await c.get("/readyz")).json()["status"])
                    await asyncio.sleep(0.25)
            t_up = time.monotonic()
            await asyncio.to_thread(redis.start)
            return await load, t_down, t_up, seen

        run, t_down, t_up, seen = asyncio.run(scenario())
        obs["readyz_while_down"] = sorted(set(seen))
        with httpx.Client(base_url=server.url, timeout=30) as c:
            wait_for(lambda: c.get("/readyz").json()["status"] == "ready", 15, "recovery")
            obs["readyz_after"] = c.get("/readyz").json()["status"]
            r = c.post(
                "/explain", content=images(10**9), headers={"Content-Type": images.content_type}
            )
            obs["explain_after_status"] = r.status_code
            eid = r.json().get("id") if r.status_code == 200 else None
            obs["stored_in_redis_after"] = bool(eid) and bool(
                redis.client().exists(f"protopnet:exp:{eid}")
            )
            obs["redis_up_metric_after"] = metric_sum(c.get("/metrics").text, "protopnet_redis_up")
        obs.update(
            requests=len(run.samples),
            statuses=run.statuses(),
            failed=len(run.failures()),
            errors_5xx=run.errors_5xx(),
            first_failures=_failures(run),
            before=_phase(run, run.started, t_down),
            during=_phase(run, t_down, t_up),
            after=_phase(run, t_up, run.ended),
        )
    finally:
        server.stop()
        redis.stop()
    return obs


# -- SIGTERM under load ---------------------------------------------------------------


def sigterm_under_load(
    tmp: Path, source: ModelSource, clients: int = 16, term_after_s: float = 4.0
) -> dict[str, Any]:
    """Load, then SIGTERM to the server; clients stop once connections are refused.

    Requests the server had begun (in flight at SIGTERM) must be answered 200; a request
    never read by the server may be refused or dropped (a new connection would be).
    """
    images = _images(source)
    server = serve(tmp, source, log_level="info")  # info: the access log counts answers

    async def scenario() -> tuple[LoadRun, float]:
        load = asyncio.create_task(
            closed_loop(server.url, images, clients, term_after_s + 60, stop_on_refused=True)
        )
        await asyncio.sleep(term_after_s)
        t_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        return await load, t_term

    try:
        run, t_term = asyncio.run(scenario())
        rc = server.proc.wait(60)
    finally:
        server.stop()
    log = server.log()
    after = log[log.find("Shutting down") :] if "Shutting down" in log else ""
    answered = len(re.findall(r'"message": "POST /explain 200"', log))
    spanning = [s for s in run.samples if s.start < t_term < s.end]
    unanswered = [s for s in run.samples if s.status is None]
    # Every request the application began is in the access log (written in a finally,
    # so even a cancelled one), under the X-Request-ID its client sent.
    seen = set(re.findall(r'"request_id": "(load-\d+)"', log))
    return {
        "clients": clients,
        "requests": len(run.samples),
        "statuses": run.statuses(),
        "errors_5xx": run.errors_5xx(),
        "http_errors": sum(1 for s in run.samples if s.status not in (None, 200)),
        "in_flight_at_sigterm": len(spanning),
        "in_flight_answered_200": sum(1 for s in spanning if s.status == 200),
        "answered_after_shutdown_began": len(re.findall(r"POST /explain 200", after)),
        "server_logged_200": answered,
        "client_received_200": len(run.ok()),
        "unanswered": len(unanswered),
        "unanswered_errors": sorted({(s.error or "").split(":")[0] for s in unanswered}),
        "unanswered_reached_app": sum(1 for s in unanswered if s.request_id in seen),
        "requests_logged_by_server": len(seen),
        "unanswered_sent_before_sigterm": sum(1 for s in unanswered if s.start < t_term),
        "exit_code": rc,
        "clean_stop_logged": "service stopped" in log,
        "seconds_to_exit": round(max((s.end for s in run.samples), default=t_term) - t_term, 2),
    }


# -- a corrupted artifact in the store -----------------------------------------------


def corrupted_artifact(tmp: Path) -> dict[str, Any]:
    """Two start-up models, one of whose weights file changed after publishing (same
    size, a few bytes flipped: only the hash can tell). What does the service do?"""
    arch, prep, classes = demo_architecture()
    store = ModelStore(tmp / "store-corrupt")
    good = publish_random(store, "good", arch, prep, classes, seed=1)
    publish_random(store, "broken", arch, prep, classes, seed=2)
    weights = store.path("broken") / "weights.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    weights.write_bytes(bytes(data))
    source = ModelSource(store.root, good, trained=False)
    server = serve(tmp, source, wait_ready=False, models="good,broken", model_retry_s=1.0)
    obs: dict[str, Any] = {"corrupted_file": str(weights)}
    try:
        wait_for(lambda: str(weights) in server.log(), 60, "the server's log naming the file")
        lines = [ln for ln in server.log().splitlines() if str(weights) in ln]
        obs["log_lines_naming_file"] = len(lines)
        obs["first_log_line"] = lines[0][:500]
        images = RequestImages(prep)
        h = {"Content-Type": images.content_type}
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.get("/readyz")
            obs["readyz"] = {"status_code": r.status_code, **r.json()}
            r = c.post("/explain", content=images(1), headers=h)
            obs["explain_default_status"] = r.status_code
            obs["explain_default_model"] = r.json().get("model", {}).get("name")
            r = c.post("/explain", content=images(2), headers=h, params={"model": good})
            obs["explain_good_status"] = r.status_code
            r = c.post("/explain", content=images(3), headers=h, params={"model": "broken"})
            obs["explain_broken"] = {"status_code": r.status_code, **r.json()}
            listing = c.get("/models").json()["models"]
            obs["models_listed"] = {m["name"]: {"loaded": m["loaded"]} for m in listing}
            obs["model_detail_broken_status"] = c.get("/models/broken").status_code
            obs["readyz_after_requests"] = c.get("/readyz").json()["status"]
    finally:
        server.stop()
    return obs


# -- training killed mid-epoch and resumed -------------------------------------------

TINY_TRAINING = [
    "train.epochs=2",
    "train.warm_epochs=1",
    "train.push_start=2",
    "train.last_layer_epochs=3",
    "data.synthetic.train_per_class=200",
]


class _Progress:
    """Reads a child's stderr on a thread; remembers tqdm's last "desc: k/n" line."""

    _re = re.compile(r"(epoch \d+ \w+):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")

    def __init__(self, stream: Any):
        self.last: tuple[str, int, int] | None = None
        self.text: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        buf = ""
        while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
            buf += chunk.decode(errors="replace")
            *parts, buf = re.split(r"[\r\n]", buf)
            for p in parts:
                self.text.append(p)
                m = self._re.search(p)
                if m:
                    self.last = (m.group(1), int(m.group(2)), int(m.group(3)))

    def join(self) -> None:
        self._thread.join(10)


def _units(run_dir: Path) -> list[tuple[int, str]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [(int(r["unit"]), f"epoch {r['epoch']} {r['stage']}") for r in rows]


def training_kill_resume(tmp: Path) -> dict[str, Any]:
    """Train the synthetic set with tiny settings, SIGKILL it in the middle of an epoch
    after its first unit is saved, then ``--resume --export``: it finishes and publishes."""
    run_dir, store_root = tmp / "run", tmp / "store-training"
    env = {**os.environ, "PROTOPNET_STORE": str(store_root), "PYTHONUNBUFFERED": "1"}
    # tqdm prints every step (its defaults print every 0.1 s: the tiny trunk's 21-step
    # epoch took 0.35 s, so the window to kill in held two lines and a slow poll could
    # miss both; with 200 images per class an epoch is 42 steps).
    env.update(TQDM_MININTERVAL="0", TQDM_MINITERS="1")
    sets = [a for s in TINY_TRAINING for a in ("--set", s)]
    cmd = [sys.executable, "-m", "training", "train", "--config", "synthetic"]
    cmd += ["--run-dir", str(run_dir), "--export", *sets]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = _Progress(proc.stderr)
    killed_at: tuple[str, int, int] | None = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            last = progress.last
            # Mid-epoch of a unit after the first saved one: some steps done, not all.
            if (
                _units(run_dir)
                and last
                and not last[0].startswith("epoch 0 ")
                and last[2] // 3 <= last[1] < last[2] - 1
            ):
                proc.send_signal(signal.SIGKILL)
                killed_at = last
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(30)
        progress.join()
    first_rc = proc.returncode
    saved_before = _units(run_dir)
    leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp" in p.name)
    t1 = time.monotonic()
    resumed = subprocess.run(
        [*cmd[:3], "--no-progress", *cmd[3:], "--resume"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    t2 = time.monotonic()
    summary: dict[str, Any] = {}
    out = resumed.stdout
    if "{" in out:
        try:
            summary = json.loads(out[out.index("{") : out.rindex("}") + 1])
        except json.JSONDecodeError:
            summary = {}
    published = summary.get("published")
    loads = False
    if published:
        ModelStore(store_root).load(published)  # verifies every file's hash
        loads = True
    return {
        "killed_with": "SIGKILL",
        "killed_at": f"{killed_at[0]} step {killed_at[1]}/{killed_at[2]}" if killed_at else None,
        "first_exit_code": first_rc,
        "units_saved_before_kill": [u for _, u in saved_before],
        "temp_files_left_by_kill": leftovers,
        "resume_exit_code": resumed.returncode,
        "resume_stderr_tail": resumed.stderr[-1500:] if resumed.returncode else "",
        "units_after_resume": [u for _, u in _units(run_dir)],
        "unit_numbers_after_resume": [i for i, _ in _units(run_dir)],
        "published": published,
        "published_loads": loads,
        "test_accuracy": (summary.get("best") or {}).get("test_accuracy"),
        "seconds_to_kill": round(t1 - t0, 1),
        "seconds_to_resume_and_publish": round(t2 - t1, 1),
    }


# -- input fuzzing --------------------------------------------------------------------


def fuzz(tmp: Path, source: ModelSource, max_time_s: float = 60.0, seed: int = 1) -> dict[str, Any]:
    """``fuzz_server`` against a fresh server for ``source``."""
    server = serve(tmp, source, log_level="warning")
    try:
        return fuzz_server(server.url, tmp, max_time_s, seed)
    finally:
        server.stop()


def fuzz_server(url: str, tmp: Path, max_time_s: float = 60.0, seed: int = 1) -> dict[str, Any]:
    """schemathesis (every phase, default generators) against the OpenAPI schema served at
    ``url``, checking only that no response is a 5xx; the server's metrics count them too."""
    junit = tmp / "schemathesis-junit.xml"
    cli = Path(sys.executable).parent / "schemathesis"
    cmd = [str(cli), "run", f"{url}/openapi.json", "--checks", "not_a_server_error"]
    cmd += ["--max-time", str(int(max_time_s)), "--seed", str(seed), "--workers", "1"]
    cmd += ["--request-timeout", "60", "--report", "junit", "--report-junit-path", str(junit)]
    spec = httpx.get(url + "/openapi.json", timeout=30).json()
    before = _server_requests(httpx.get(url + "/metrics", timeout=30).text)
    t0 = time.monotonic()
    # cwd: schemathesis keeps a cache folder (.schemathesis/) in its working directory.
    st = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=max_time_s + 120)
    seconds = time.monotonic() - t0
    # Only what the fuzzer caused (not the start-up readiness probes).
    after = _server_requests(httpx.get(url + "/metrics", timeout=30).text)
    requests = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}
    tests = failures = 0
    if junit.exists():
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        tests = sum(int(s.get("tests", 0)) for s in suites)
        failures = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    return {
        "exit_code": st.returncode,
        "seconds": round(seconds, 1),
        "operations": tests,
        "failed_operations": failures,
        "failures": re.findall(r"_{3,} (\w+ \S+) _{3,}", st.stdout),
        "server_requests": sum(requests.values()),
        "server_statuses": requests,
        "server_5xx": sum(n for code, n in requests.items() if code.startswith("5")),
        "unresolved_refs": unresolved_refs(spec),
        "skipped_schema_parts": re.findall(r"unresolvable reference `([^`]+)`", st.stdout),
        "output_tail": st.stdout[-3000:] + st.stderr[-1000:],
    }


def unresolved_refs(spec: dict[str, Any]) -> list[str]:
    """Every local "$ref" in an OpenAPI document that points nowhere in it ("where: ref")."""
    bad: list[str] = []

    def resolves(ref: str) -> bool:
        node: Any = spec
        for part in ref.removeprefix("#/").split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#") and not resolves(ref):
                bad.append(f"{where}: {ref}")
            for k, v in node.items():
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    walk(spec, "#")
    return bad


def _server_requests(metrics: str) -> dict[str, int]:
    """Requests the server answered, by status (from protopnet_requests_total)."""
    out: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("protopnet_requests_total{"):
            m = re.search(r'status="(\d+)"', line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0) + int(float(line.rsplit(" ", 1)[1]))
    return dict(sorted(out.items()))
