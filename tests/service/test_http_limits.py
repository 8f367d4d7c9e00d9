"""What a misbehaving client does to the real server over a raw socket: a request head
over the limit is refused at once and others stay served; a client that leaves in the
middle of its upload is a client disconnect (499), not a server error."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from tests.support.servers import ServerProcess, metric_value


def raw(server: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s


def send_huge_header(server: ServerProcess, size: int, out: dict) -> None:
    """GET /healthz with one header of ``size`` bytes, streamed in 64 KiB pieces; records
    how far it got and what the server answered."""
    s = raw(server)
    t0 = time.monotonic()
    sent = 0
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        piece = b"a" * 65536
        while sent < size:
            s.sendall(piece)
            sent += len(piece)
        s.sendall(b"\r\n\r\n")
    except OSError:  # the server closed the connection: what it should do
        pass
    try:
        out["answer"] = s.recv(200)
    except OSError:
        out["answer"] = b""
    out["sent"], out["seconds"] = sent, time.monotonic() - t0
    s.close()


def test_an_oversized_request_head_is_refused_and_others_stay_served(server) -> None:
    results: list[dict] = [{}, {}]
    senders = [
        threading.Thread(target=send_huge_header, args=(server, 64 << 20, r)) for r in results
    ]
    for t in senders:
        t.start()
    slowest = 0.0
    with httpx.Client(base_url=server.url, timeout=10) as c:
        while any(t.is_alive() for t in senders):
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.01)
    for t in senders:
        t.join()
    for r in results:
        # Refused after about the limit (64 KiB), not after reading 64 MB.
        assert r["sent"] < 8 << 20, r
        assert r["answer"] == b"" or r["answer"].startswith(b"HTTP/1.1 4"), r
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s beside the oversized requests"
    # A head within the limit is served.
    ok = httpx.get(server.url + "/healthz", headers={"X-Fine": "a" * 20000})
    assert ok.status_code == 200


def test_a_client_leaving_mid_upload_is_not_a_server_error(server, client) -> None:
    before = client.get("/metrics").text
    log_start = len(server.log())
    s = raw(server)
    s.sendall(
        b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100000\r\n\r\n\x89PNG\r\n\x1a\n0123456789"
    )
    time.sleep(0.3)  # the server has begun reading the body
    s.close()
    deadline = time.monotonic() + 10
    after = before
    while time.monotonic() < deadline:
        after = client.get("/metrics").text
        if metric_value(after, "protopnet_requests_total", route="/explain", status="499") > (
            metric_value(before, "protopnet_requests_total", route="/explain", status="499")
        ):
            break
        time.sleep(0.1)

    def count(text: str, status: str) -> float:
        return metric_value(text, "protopnet_requests_total", route="/explain", status=status)

    assert count(after, "499") == count(before, "499") + 1
    assert count(after, "500") == count(before, "500")
    log = server.log()[log_start:]
    assert log.count("client disconnected before its request body arrived") == 1, log
    assert "Traceback" not in log and "unhandled error" not in log, log
