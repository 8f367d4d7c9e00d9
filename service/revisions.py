"""Revisions over HTTP: ``python -m training revise`` run as a child process, its state
kept as a JSON record in the store, beside the model it mends.

A revision refits the last layer on the training split (the demo: 1.4 min on 2 cores,
bench/results/interpretability.json), longer than a proxy holds a request open, so the
route answers 202 at once and the record says how it went. The child process keeps the
refit's threads and memory out of the serving process, and is the command line's own
code path, errors included. Records live in ``<store>/<name>/.revisions/<id>.json``
(hidden from the store's version listing): every replica sharing the store reads them.
A replica runs one revision at a time; one that stops kills its child and marks the
record failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model_store.manifest import Manifest
from protokit.atomic import atomic_write
from service.errors import ServiceError

log = logging.getLogger("service.revisions")

RECORDS = ".revisions"
STDERR_CHARS = 2000  # of a failed child's standard error kept in the record


class RevisionBusyError(ServiceError):
    status, code = 409, "revision_running"


class RevisionUnavailableError(ServiceError):
    status, code = 501, "revision_unavailable"


class RevisionRejectedError(ServiceError):
    status, code = 422, "invalid_revision"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Revisions:
    """The revisions this replica starts, and the records of all of them."""

    def __init__(self, store_root: Path):
        self.store_root = Path(store_root)
        self._child: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: dict[str, Any] | None = None

    def _path(self, name: str, rid: str) -> Path:
        return self.store_root / name / RECORDS / f"{rid}.json"

    def _write(self, record: dict[str, Any]) -> None:
        path = self._path(record["model"].split("@", 1)[0], record["id"])
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, json.dumps(record, indent=1).encode())

    def record(self, name: str, rid: str) -> dict[str, Any] | None:
        """The record of revision ``rid`` of model ``name``; None when there is none."""
        if not rid.isalnum():
            return None
        try:
            return dict(json.loads(self._path(name, rid).read_text()))
        except FileNotFoundError:
            return None

    def start(
        self,
        m: Manifest,
        remove: list[int],
        reason: str | None,
        new_name: str | None,
        aliases: list[str],
        by: str,
    ) -> dict[str, Any]:
        """Check the request against ``m``'s manifest, write its record and start the
        child; returns the record (state "running")."""
        if importlib.util.find_spec("training") is None:
            raise RevisionUnavailableError(
                "this service was installed without the training package, which refits the "
                "last layer: run revisions where `python -m training` and the model's "
                "training data are at hand"
            )
        from training.revise import ReviseError, check_removal

        try:
            check_removal(m, remove)
        except ReviseError as exc:
            raise RevisionRejectedError(str(exc)) from None
        if self._running is not None:
            raise RevisionBusyError(
                f"revision {self._running['id']} of {self._running['model']} is running on "
                "this replica; wait for it to finish (its record says when)",
                headers={"Retry-After": "30"},
            )
        source = f"{m.name}@{m.version}"
        record: dict[str, Any] = {
            "id": uuid.uuid4().hex[:16],
            "model": source,
            "remove": sorted(set(remove)),
            "reason": reason,
            "name": new_name,
            "aliases": aliases,
            "by": by,
            "state": "running",
            "started_at": _now(),
            "finished_at": None,
            "result": None,
            "error": None,
        }
        try:
            self._write(record)
        except OSError as exc:
            raise RevisionUnavailableError(
                f"cannot write to the store at {self.store_root} ({exc.strerror or exc}): "
                "revisions publish a new version, so they need a writable store"
            ) from None
        self._running = record
        self._task = asyncio.get_running_loop().create_task(self._run(record))
        return record

    async def _run(self, record: dict[str, Any]) -> None:
        argv = [
            sys.executable, "-m", "training", "revise",
            "--model", record["model"],
            "--remove", ",".join(map(str, record["remove"])),
            "--store", str(self.store_root),
            "--by", record["by"],
        ]  # fmt: skip
        if record["reason"]:
            argv += ["--reason", record["reason"]]
        if record["name"]:
            argv += ["--name", record["name"]]
        for alias in record["aliases"]:
            argv += ["--alias", alias]
        try:
            self._child = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            out, err = await self._child.communicate()
            text = err.decode(errors="replace").strip()
            if self._child.returncode == 0:
                record |= {"state": "done", "result": json.loads(out[out.index(b"{") :])}
            else:
                # The command line's own message ("error: ...") when it gave one.
                last = [ln for ln in text.splitlines() if ln.startswith("error: ")]
                record |= {
                    "state": "failed",
                    "error": last[-1][7:] if last else text[-STDERR_CHARS:] or "no output",
                }
        except asyncio.CancelledError:
            record |= {"state": "failed", "error": "the service stopped during the revision"}
            raise
        except Exception as exc:  # the record must end either way
            log.exception("revision %s", record["id"])
            record |= {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            record["finished_at"] = _now()
            with contextlib.suppress(OSError):
                self._write(record)
            self._running, self._child = None, None
            log.info(
                "revision finished",
                extra={"id": record["id"], "model": record["model"], "state": record["state"]},
            )

    async def close(self) -> None:
        """Stop a running revision: kill its child and mark its record failed."""
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
