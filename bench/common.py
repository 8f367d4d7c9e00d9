"""Helpers shared by the benchmarks: the device's name, medians, atomic result files, and
the CUB-scale architecture the reference's figures were measured on."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from protokit.atomic import atomic_write

# Where results go: bench/results, or $PROTOPNET_BENCH_RESULTS (a GPU machine's runs are
# written to their own folder and kept beside the CPU ones, in bench/results/gpu).
RESULTS_DIR = Path(
    os.environ.get("PROTOPNET_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)


def device_name(device: Any = None) -> str:
    """The accelerator in use (CUDA device name) or the CPU model and its core count."""
    import torch

    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        index = dev.index if dev is not None and dev.index is not None else 0
        return f"cuda: {torch.cuda.get_device_name(index)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def p50(values: Iterable[float]) -> float:
    """The median (robust to the odd slow run on a shared machine)."""
    vals = list(values)
    if not vals:
        raise ValueError("p50 of no values")
    return float(statistics.median(vals))


def seconds_of(fn: Callable[[], Any], device: Any = None) -> float:
    """Wall-clock seconds of one ``fn()``; on a CUDA device, until its queued work ends."""
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, data: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically (temp file + os.replace)."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    record = {"benchmark": name, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **data}
    atomic_write(path, json.dumps(record, indent=1, allow_nan=False, default=str) + "\n")
    return path
