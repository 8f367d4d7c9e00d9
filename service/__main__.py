"""python -m service [--host H] [--port P] [--store DIR]: run the API with uvicorn.

Everything else comes from PROTOPNET_* environment variables (service.settings). On
SIGTERM/SIGINT uvicorn stops accepting connections and lets in-flight requests finish
for up to PROTOPNET_GRACEFUL_SHUTDOWN_S seconds before the models are unloaded.
"""

from __future__ import annotations

import argparse
import os

import uvicorn

from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="bind address (PROTOPNET_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (PROTOPNET_PORT, default 8000)")
    parser.add_argument("--store", help="model store folder (PROTOPNET_STORE)")
    args = parser.parse_args(argv)
    # The app factory reads the environment, so overrides travel through it.
    for key, value in (("HOST", args.host), ("PORT", args.port), ("STORE", args.store)):
        if value is not None:
            os.environ[f"PROTOPNET_{key}"] = str(value)
    settings = Settings()
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        access_log=False,  # the service writes its own structured access log
        log_level=settings.log_level,
        proxy_headers=True,
        root_path=settings.root_path,
        # h11, not httptools: httptools has no bound on a request's head (a 64 MB header
        # was read whole, and two of them stalled other clients' /healthz for 5.6 s);
        # h11 refuses a head over the limit with a 400 and closes. Measured side by side
        # on 2 cores, photo model: /explain 83-90 req/s with h11, 87-94 with httptools
        # for one client, 93-107 and 95-100 for 16: within the run-to-run spread.
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )


if __name__ == "__main__":
    main()
