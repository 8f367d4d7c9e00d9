"""Which torch device a setting names."""

from __future__ import annotations

import torch

from protopnet.errors import ProtoPNetError


class DeviceError(ProtoPNetError, ValueError):
    """A device setting this machine cannot honour."""


def pick_device(choice: str = "auto", setting: str = "device") -> torch.device:
    """ "auto": CUDA when present, else the CPU; otherwise the device named ("cpu",
    "cuda", "cuda:1"). A GPU comes with its index ("cuda" -> "cuda:0"), as /readyz and
    the logs name it. Asking for CUDA where there is none is a DeviceError naming
    ``setting``."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(choice)
    except RuntimeError:
        raise DeviceError(f"{setting} is {choice!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{setting} is {choice!r} but no CUDA device is available; valid here: auto, cpu"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev
