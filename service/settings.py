"""The service's configuration: one pydantic-settings class, environment prefix PROTOPNET_.

Lists (models, API keys, CORS origins) are read from comma-separated variables, e.g.
``PROTOPNET_API_KEYS=key1,key2``; JSON arrays work too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset), else
    ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob of the explanation service. Architecture and training settings live
    with the model in the store, never here."""

    model_config = SettingsConfigDict(env_prefix="PROTOPNET_", extra="ignore")

    # -- models ---------------------------------------------------------------------
    store: Path = Path("store")  # the model store's root folder (a volume in Docker)
    # The path prefix a proxy serves the API under (e.g. "/protopnet"): links in the JSON
    # carry it. Cached explanations do not, so replicas behind different prefixes share them.
    root_path: str = ""
    default_model: str = (
        "fashion-mnist@production"  # the demo model; name, name@version or name@alias
    )
    # Loaded and warmed up at start-up (default: the default model). Others load on demand.
    models: CommaList = Field(default_factory=list)
    max_loaded_models: int = Field(default=4, ge=1)  # least recently used ones are unloaded
    model_retry_s: float = Field(default=5.0, gt=0)  # start-up models missing: retry interval
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1" ...
    # Intra-op threads of each model's thread. Unset: the usable cores divided by the
    # start-up models (service.registry.Runtime). Set it when serving several models at
    # once. The worker pool runs torch single-threaded, see protokit/threads.py.
    torch_threads: int | None = Field(default=None, ge=1)
    # Convolutions in channels-last layout: oneDNN's fastest path on a CPU (VGG-19's
    # forward about 1.15x, the demo's about 1.2x faster: bench/memory_format.py) and
    # tensor cores' on a GPU. Off: the layout the weights were saved in (NCHW).
    channels_last: bool = True
    # TF32 on a GPU: cuDNN's convolutions (the trunk and add-on layers) with 10-bit
    # mantissas, faster, whose features, and so logits, then differ from a CPU's by about
    # TF32's precision (1e-3 relative). Off: a GPU answers with a CPU's numbers. Prototype
    # distances, matrix products, are true float32 either way (l2_distances).
    allow_tf32: bool = False

    # -- batching -------------------------------------------------------------------
    max_batch: int = Field(default=16, ge=1, le=1024)
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0)  # how long a batch waits to fill
    max_queue: int = Field(default=256, ge=1)  # images waiting per model; beyond it -> 503
    # Threads that decode uploads, make each image's maps, boxes and JSON after its forward
    # (whenever the model thread has other work) and encode PNGs. Unset: one per core, at
    # least 4 and at most 32 (``pool_threads``). Their heavy parts (decoding, the
    # percentiles' partial sorts, PNG encoding) release the GIL, so on a many-core GPU
    # machine this is how many images are finished side by side (it was a fixed 4, on
    # the H100 machine's 16 cores).
    worker_threads: int | None = Field(default=None, ge=1)

    # -- explanations ---------------------------------------------------------------
    # Heatmaps, boxes' resolution and the display image are capped at this side (pixels).
    # Upsampling and percentiles scale with its square: 384 keeps /explain within about
    # 1.3x of a bare forward pass for large photos; raise it for sharper heatmaps.
    max_map_side: int = Field(default=384, ge=16, le=4096)
    default_top_classes: int = Field(default=3, ge=1)
    default_top_prototypes: int = Field(default=10, ge=1)
    max_top_classes: int = Field(default=50, ge=1)
    max_top_prototypes: int = Field(default=200, ge=1)
    report_rows: int = Field(default=10, ge=1)  # rows per class on the report page
    # An answer is unfamiliar when its familiarity score is below this percentile of the
    # validation images' (so about this share of images like the training data's are
    # called unfamiliar; see protopnet/familiarity.py).
    familiarity_percentile: float = Field(default=1.0, ge=0.0, le=100.0)

    # -- limits ---------------------------------------------------------------------
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)  # 10 MiB
    # A request's line and headers together; beyond it the connection gets a 400 and is
    # closed (uvicorn's h11 limit). nginx's default allows 4 x 8 KiB header lines.
    max_header_bytes: int = Field(default=64 * 1024, ge=4096)
    max_image_pixels: int = Field(default=40_000_000, ge=64)  # also Pillow's bomb threshold
    max_instances: int = Field(default=16, ge=1)  # images per KServe-style request

    # -- cache ----------------------------------------------------------------------
    redis_url: str | None = None  # e.g. redis://redis:6379/0; None: in-process cache only
    cache_ttl_s: int = Field(default=3600, ge=1)
    local_cache_entries: int = Field(default=256, ge=1)
    local_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    redis_timeout_s: float = Field(default=0.5, gt=0)
    redis_retry_s: float = Field(default=2.0, gt=0)  # reconnect attempt interval while degraded

    # -- HTTP -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Empty: no key needed. Set: every route needs one but /healthz and /readyz (probes);
    # /metrics too (Prometheus sends it: ``authorization: {credentials: <key>}``).
    api_keys: CommaList = Field(default_factory=list)
    # Keys that may also change the store over HTTP (PUT an alias through the promotion
    # gate, POST a revision). Empty: those routes answer 403. Give them to an instance
    # with a writable store, not to the read-only serving replicas.
    admin_keys: CommaList = Field(default_factory=list)
    # /docs, /redoc and /openapi.json. Unset: served unless API keys are set (a keyed
    # service does not describe itself to strangers); true or false decides outright.
    docs: bool | None = None
    api_key_header: str = "X-API-Key"
    cors_origins: CommaList = Field(default_factory=list)
    graceful_shutdown_s: int = Field(default=30, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("models", "api_keys", "admin_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            s = v.strip()
            if s.startswith("["):
                import json

                return json.loads(s)
            return [x.strip() for x in s.split(",") if x.strip()]
        return v

    @property
    def pool_threads(self) -> int:
        """The worker pool's size: ``worker_threads``, or one per core within 4 to 32."""
        if self.worker_threads is not None:
            return self.worker_threads
        return min(32, max(4, usable_cores()))

    @property
    def serves_docs(self) -> bool:
        return self.docs if self.docs is not None else not self.api_keys

    def startup_models(self) -> list[str]:
        """The model references loaded at start-up, the default first."""
        return list(dict.fromkeys([self.default_model, *self.models]))
