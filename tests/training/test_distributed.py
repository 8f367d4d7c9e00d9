"""Multi-process training through torchrun: two CPU processes over gloo."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protopnet.model import create_model
from tests.training.conftest import REPO, TINY, overrides_args
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.data import build_splits
from training.distributed import DistributedError, ddp_cuda_device, init_distributed
from training.run import plan_units

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_processes_train_a_model_of_the_same_shape(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "training", "--no-progress", "train", "--config", "synthetic",
        "--run-dir", str(run_dir), *overrides_args([*TINY, "train.channels_last=false"]),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["best"]["test_accuracy"] is not None  # printed once, by rank 0

    cfg = load_config("synthetic", TINY)
    tensors, meta = load_checkpoint(run_dir / "checkpoints", "last")
    single = create_model(cfg.model.architecture(cfg.data.synthetic.num_classes)).state_dict()
    got = {k[len("model.") :]: v.shape for k, v in tensors.items() if k.startswith("model.")}
    assert got == {k: v.shape for k, v in single.items()}
    assert meta["units_done"] == len(plan_units(cfg.train))
    hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Rank 0 logs its own shard: half of every epoch (DistributedSampler), whole batches.
    n_train = len(build_splits(cfg.data, cfg.train.seed).train)
    sgd = [h for h in hist if h["stage"] in ("warm", "joint")]
    assert len(sgd) == cfg.train.epochs
    assert all(0 < h["train"]["images"] <= math.ceil(n_train / 2) for h in sgd)


def test_more_processes_than_gpus_is_a_clear_error() -> None:
    assert ddp_cuda_device(1, 2) == torch.device("cuda", 1)
    with pytest.raises(
        DistributedError, match=r"local rank 1 but the node has 1 GPU.*--nproc_per_node=1"
    ):
        ddp_cuda_device(1, 1)


def test_a_cpu_run_on_a_gpu_machine_uses_gloo_and_leaves_cuda_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two gloo processes on a one-GPU machine: rank 1 once asked CUDA for device 1 and
    died with "invalid device ordinal" (seen on an H100). Process-group start is faked:
    the test above starts real processes."""
    import torch.distributed as dist

    backends: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def no_cuda(device: object) -> None:
        raise AssertionError(f"CUDA device {device} set for a CPU run")

    monkeypatch.setattr(torch.cuda, "set_device", no_cuda)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = init_distributed(cuda=False)
    assert backends == ["gloo"] and info.local_rank == 1 and info.enabled
    # On GPUs, more processes than GPUs stops before any process group is joined.
    with pytest.raises(DistributedError, match="needs one GPU per process"):
        init_distributed(cuda=True)
    assert backends == ["gloo"]


def test_two_nodes_meet_through_the_c10d_rendezvous(tmp_path: Path) -> None:
    """Multi-node launch as an operator runs it, each "node" its own torchrun on
    loopback: --nnodes=2, one process each, a c10d rendezvous endpoint. Both join one
    job of world size 2; rank 0 alone writes the run and prints the summary."""
    run_dir = tmp_path / "two-nodes"
    port = _free_port()

    def node() -> subprocess.Popen[str]:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=protopnet-test",
            "-m", "training", "--no-progress", "train", "--config", "synthetic",
            "--run-dir", str(run_dir), *overrides_args([*TINY, "train.channels_last=false"]),
        ]  # fmt: skip
        return subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip

    nodes = [node(), node()]
    outs = [p.communicate(timeout=600) for p in nodes]
    for p, (_, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summaries = [out for out, _ in outs if "{" in out]
    assert len(summaries) == 1  # printed once, by rank 0
    assert json.loads(summaries[0][summaries[0].index("{") :])["best"]["test_accuracy"] is not None
    cfg = load_config("synthetic", TINY)
    n_train = len(build_splits(cfg.data, cfg.train.seed).train)
    hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sgd = [h for h in hist if h["stage"] in ("warm", "joint")]
    assert sgd and all(0 < h["train"]["images"] <= math.ceil(n_train / 2) for h in sgd)
    _, meta = load_checkpoint(run_dir / "checkpoints", "last")
    assert meta["units_done"] == len(plan_units(cfg.train))
