"""Readiness before and after models exist, API keys, CORS, request ids, OpenAPI."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

from model_store import ModelStore
from tests.service.store_builder import build_photo_model
from tests.support.servers import start_server

pytestmark = pytest.mark.slow


def test_readiness_keys_cors_and_request_ids(tmp_path: Path) -> None:
    empty = tmp_path / "store"
    empty.mkdir()
    srv = start_server(
        tmp_path,
        empty,
        wait_ready=False,
        models="photo",
        api_keys="key-one,key-two",
        cors_origins="http://front.example",
        model_retry_s=0.5,
    )
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            # Alive but not ready: the default model is not in the store yet.
            assert c.get("/healthz").json() == {"status": "alive"}
            r = c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["status"] == "failed"
            assert "unknown model 'photo'" in r.json()["detail"]
            # With keys set, metrics need one too (Prometheus sends it as a bearer token)
            # and the API docs are not served unless PROTOPNET_DOCS says so.
            r = c.get("/metrics")
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
            scrape = c.get("/metrics", headers={"Authorization": "Bearer key-one"})
            assert scrape.status_code == 200 and "protopnet_requests_total" in scrape.text
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert c.get(path, headers={"X-API-Key": "key-one"}).status_code == 404, path

            # API keys: header or bearer token; the error says how to send one.
            r = c.get("/models")
            assert r.status_code == 401 and "X-API-Key" in r.json()["error"]["message"]
            r = c.get("/models", headers={"X-API-Key": "wrong"})
            assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
            assert c.get("/models", headers={"X-API-Key": "key-two"}).status_code == 200
            auth = {"Authorization": "Bearer key-one"}
            assert c.get("/models", headers=auth).json()["models"] == []

            # CORS for the configured front-end only.
            pre = {"Origin": "http://front.example", "Access-Control-Request-Method": "POST"}
            r = c.options("/explain", headers=pre)
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "http://front.example"
            r = c.get("/healthz", headers={"Origin": "http://evil.example"})
            assert "access-control-allow-origin" not in r.headers

            # Request ids: the client's is echoed, in the header and in error bodies.
            r = c.get("/models/photo", headers={**auth, "X-Request-ID": "trace-42"})
            assert r.status_code == 404 and r.headers["x-request-id"] == "trace-42"
            assert r.json()["error"]["request_id"] == "trace-42"
            r = c.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
            assert r.headers["x-request-id"] != "bad id with spaces"

            # Publish the model: the server loads it, warms it up and becomes ready.
            build_photo_model(ModelStore(empty))
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            r = c.get("/readyz")
            assert r.status_code == 200 and r.json()["status"] == "ready"
            assert r.json()["models"] == ["photo@1"] and r.json()["cache"] == "local"
            # Where it runs: PROTOPNET_DEVICE is "auto", so the GPU where there is one.
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
            assert r.json()["devices"] == {"photo@1": device}

        log = srv.log()
        assert '"request_id": "trace-42"' in log  # structured access log carries the id
    finally:
        srv.stop()


def test_docs_are_served_without_keys_or_when_asked(tmp_path: Path, server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()  # no keys: docs are public
    assert "/explain" in spec["paths"] and "ExplainResponse" in spec["components"]["schemas"]
    body = spec["paths"]["/explain"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "image/*", "application/dicom"}
    assert httpx.get(server.url + "/docs").status_code == 200
    empty = tmp_path / "store"
    empty.mkdir()
    srv = start_server(tmp_path, empty, wait_ready=False, api_keys="k", docs="true")
    try:
        assert httpx.get(srv.url + "/openapi.json").status_code == 200  # asked for: public
        assert httpx.get(srv.url + "/redoc").status_code == 200
        assert httpx.get(srv.url + "/models").status_code == 401  # the rest keeps its key
    finally:
        srv.stop()


def test_numpy_blas_runs_single_threaded_in_the_server(server) -> None:
    """The server's own reading of its BLAS libraries (threadpoolctl), from its start-up
    log line: numpy's OpenBLAS defaults to one thread per core."""
    import json

    start = next(
        json.loads(line)
        for line in server.log().splitlines()
        if line.startswith("{") and '"service starting"' in line
    )
    assert start["blas_threads"] == 1, start
