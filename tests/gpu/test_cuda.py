"""The CUDA paths against the CPU ones: the same model gives the same explanation, push
picks the same patches, training with mixed precision trains and resumes, and the
service run on the GPU answers as the CPU service does, through uvicorn.

These need a CUDA device; elsewhere (CI) they are skipped and say so. On a GPU machine
``scripts/gpu-suite.sh`` runs them with the rest of the suite and the GPU benchmarks.
"""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from protopnet.config import Preprocessing, ProtoPNetConfig
from protopnet.explain import PrototypeExplainer
from protopnet.model import (
    ProtoPNetOutput,
    create_model,
    distance_to_similarity,
    l2_distances,
)
from protopnet.preprocess import eval_transform
from tests.protopnet.models import pushed_model
from tests.service.store_builder import build_photo_model, photos
from tests.support.servers import (
    RedisProcess,
    ServerProcess,
    free_port,
    metric_value,
    start_server,
)
from tests.training.conftest import TINY
from tests.training.helpers import model_and_images
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.push import push_prototypes, self_distance_maps
from training.run import Trainer, plan_units

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here; on a GPU machine run scripts/gpu-suite.sh",
)

CUDA = torch.device("cuda")


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """True float32 on the GPU: TF32, which cuDNN uses for convolutions by default, keeps
    10 mantissa bits, too few to compare numbers with the CPU's to 1e-4."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _boxes_close(a: torch.Tensor, b: torch.Tensor, px: int) -> None:
    """Boxes from maps that differ in the last float bits: a pixel at the percentile
    threshold may fall on either side, so edges may move by a pixel or so."""
    assert a.shape == b.shape
    assert int((a - b).abs().max()) <= px, (a.tolist(), b.tolist())


def test_a_patch_equal_to_a_prototype_scores_the_top_similarity_under_tf32() -> None:
    """With cuDNN's default (TF32 convolutions) on, as in training, distances still come
    out in true float32. When they were convolutions, a patch identical to a prototype
    scored 7.4 instead of 9.2 on an H100: TF32 moved d by about 5e-4 where the log
    activation is steepest (by 0.04 on these features, simulated on a CPU)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        g = torch.Generator().manual_seed(0)
        z = torch.rand(2, 128, 7, 7, generator=g)  # like the add-on layers' sigmoid output
        protos = torch.stack([z[0, :, 3, 4], z[1, :, 0, 6]]).view(2, 128, 1, 1).clone()
        d = l2_distances(z.to(CUDA), protos.to(CUDA)).cpu()
        sim = distance_to_similarity(d, "log", 1e-4)
        # Push's activation maps of each prototype over its own source, likewise.
        own = self_distance_maps(z.to(CUDA), protos.to(CUDA)).cpu()  # latent j, prototype j
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    # log((0 + 1) / (0 + 1e-4)) = 9.21. float32's own cancellation leaves d a few 1e-6
    # off on a CPU (9.0-9.2 over seeds); TF32's leaves it about 1e-3 off (6.9 at most).
    top = math.log(1e4)
    assert float(sim[0, 0, 3, 4]) > top - 0.5, float(sim[0, 0, 3, 4])
    assert float(sim[1, 1, 0, 6]) > top - 0.5, float(sim[1, 1, 0, 6])
    np.testing.assert_allclose(
        d.numpy(), l2_distances(z.double(), protos.double()).numpy(), atol=1e-4
    )
    np.testing.assert_allclose(own[0].numpy(), d[0, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(own[1].numpy(), d[1, 1].numpy(), atol=1e-4)


@pytest.mark.usefixtures("exact_fp32")
def test_a_pushed_model_scores_alike_on_cuda_and_the_cpu_at_any_batch(exact_fp32) -> None:
    """Pushed prototypes are exact matches, where float32 distances were cancellation
    residue; the model's float64 distances give the CPU's logits and similarities on the
    GPU, at batch 1 and 16, NCHW and channels-last."""
    model, x = pushed_model()
    gpu = copy.deepcopy(model).to(CUDA)
    with torch.inference_mode():
        cpu = model.forward_full(x)
        outs = {"cuda batch 16": gpu.forward_full(x.to(CUDA))}
        singles = [gpu.forward_full(x[i : i + 1].to(CUDA)) for i in range(16)]
        outs["cuda batch 1"] = ProtoPNetOutput(
            logits=torch.cat([o.logits for o in singles]),
            min_distances=torch.cat([o.min_distances for o in singles]),
            distances=torch.cat([o.distances for o in singles]),
            features=torch.cat([o.features for o in singles]),
        )
        gpu.to(memory_format=torch.channels_last)
        cl = x.to(CUDA).contiguous(memory_format=torch.channels_last)
        outs["cuda channels-last"] = gpu.forward_full(cl)
    for name, out in outs.items():
        np.testing.assert_allclose(
            out.logits.cpu().numpy(), cpu.logits.numpy(), rtol=1e-5, atol=1e-5, err_msg=name
        )
        np.testing.assert_allclose(
            model.similarity(out.min_distances.cpu()).numpy(),
            model.similarity(cpu.min_distances).numpy(),
            rtol=1e-5,
            atol=1e-5,
            err_msg=name,
        )


def test_explanations_on_cuda_match_the_cpu() -> None:
    torch.manual_seed(3)
    cfg = ProtoPNetConfig(
        backbone="small_cnn", num_classes=4, prototypes_per_class=3, prototype_depth=32, img_size=64
    )
    prep = Preprocessing(img_size=64, resize="pad")
    cpu_model = create_model(cfg).eval()
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    pics = [Image.fromarray(p) for p in photos().values()]
    sizes = [p.size for p in pics]
    x = torch.stack([eval_transform(prep)(p) for p in pics])
    cpu = PrototypeExplainer(cpu_model, prep).attribute(x, sizes, 3, 5)
    for frozen in (False, True):
        gpu = PrototypeExplainer(gpu_model, prep, frozen=frozen).attribute(x.to(CUDA), sizes, 3, 5)
        for c, g in zip(cpu, gpu, strict=True):
            assert g.logits.device.type == "cpu"  # results come back to the host
            torch.testing.assert_close(g.logits, c.logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(g.similarities, c.similarities, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(g.points, c.points, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(g.points.sum(1).numpy(), g.logits[g.top_classes], rtol=1e-4)
            assert g.top_classes == c.top_classes
            assert g.shown == c.shown
            torch.testing.assert_close(g.maps, c.maps, rtol=1e-3, atol=1e-3)
            _boxes_close(g.boxes, c.boxes, px=2)


def test_the_device_path_on_cuda_gives_the_numpy_paths_explanations() -> None:
    """The same forward outputs explained on the GPU (batched torch ops) and on the CPU
    (numpy): boxes, peaks and shown prototypes exact, numbers within float32 rounding."""
    torch.manual_seed(5)
    cfg = ProtoPNetConfig(
        backbone="small_cnn", num_classes=6, prototypes_per_class=4, prototype_depth=16,
        img_size=224,
    )  # fmt: skip
    model = create_model(cfg).eval()
    prep = Preprocessing(img_size=224, resize="pad")
    sim = torch.rand(6, 24, 7, 7)
    logits, min_d = torch.randn(6, 6), torch.rand(6, 24)
    sizes = [(224, 224), (224, 224), (640, 480), (97, 41), (224, 224), (1000, 300)]
    ts, ns = [3, 1, 6, 2, 3, 4], [10, 0, 5, 24, 3, 2]
    on_cpu = PrototypeExplainer(model, prep, max_map_side=512, frozen=True).explain_maps(
        sim, logits, min_d, sizes, ts, ns
    )
    gpu = PrototypeExplainer(model.to(CUDA), prep, max_map_side=512, frozen=True)
    on_gpu = gpu.explain_maps(sim.to(CUDA), logits.to(CUDA), min_d.to(CUDA), sizes, ts, ns)
    for c, g in zip(on_cpu, on_gpu, strict=True):
        assert g.boxes.device.type == "cpu"  # results come back to the host
        assert (g.top_classes, g.top_prototypes, g.shown) == (
            c.top_classes,
            c.top_prototypes,
            c.shown,
        )
        np.testing.assert_array_equal(g.boxes.numpy(), c.boxes.numpy())
        np.testing.assert_array_equal(g.peaks.numpy(), c.peaks.numpy())
        torch.testing.assert_close(g.points, c.points, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.maps, c.maps, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("exact_fp32")
def test_push_on_cuda_picks_the_cpu_patches() -> None:
    model, images = model_and_images(num_classes=3, proto_size=(2, 2))
    prep = Preprocessing(img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    gpu_model = copy.deepcopy(model).to(CUDA)
    on_cpu = push_prototypes(model, images, prep, batch_size=5, visualize=False)
    on_gpu = push_prototypes(gpu_model, images, prep, batch_size=5, device=CUDA, visualize=False)
    for c, g in zip(on_cpu.records, on_gpu.records, strict=True):
        assert (g.source_image_id, g.patch_hw) == (c.source_image_id, c.patch_hw)
        assert g.distance == pytest.approx(c.distance, rel=1e-4, abs=1e-5)
        assert g.box is not None and c.box is not None
        assert max(abs(a - b) for a, b in zip(g.box, c.box, strict=True)) <= 1
    torch.testing.assert_close(
        gpu_model.prototype_vectors.cpu(), model.prototype_vectors, rtol=1e-5, atol=1e-6
    )


def test_mixed_precision_training_on_cuda_trains_and_resumes(tmp_path: Path) -> None:
    """The shipped synthetic config on CUDA with AMP (bf16 where the GPU has it) reaches
    the accuracy the CPU run is held to, with finite losses; a short run stopped
    part-way resumes to the end."""
    cfg = load_config("synthetic", ["train.device=cuda", "train.amp=true"])
    whole = Trainer(cfg, tmp_path / "whole", progress=False)
    assert whole.device.type == "cuda" and whole.amp_dtype in (torch.bfloat16, torch.float16)
    summary = whole.run()
    lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    losses = [
        rec[p]["loss"] for rec in map(json.loads, lines) for p in ("train", "val") if p in rec
    ]
    assert losses and all(math.isfinite(v) for v in losses)
    chance = 1 / cfg.data.synthetic.num_classes
    assert summary["best"]["test_accuracy"] >= 0.8 > 2 * chance  # the CPU run's bar

    short = load_config("synthetic", [*TINY, "train.device=cuda", "train.amp=true"])
    split = tmp_path / "split"
    stopped = Trainer(short, split, progress=False).run(max_units=3)
    assert stopped["stopped_after_units"] == 3
    Trainer(short, split, progress=False).run(resume=True)
    units = [json.loads(s)["unit"] for s in (split / "metrics.jsonl").read_text().splitlines()]
    assert units == list(range(len(plan_units(short.train))))
    tensors, _ = load_checkpoint(split / "checkpoints", "last")
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))


# -- the service on the GPU, over HTTP ------------------------------------------------


@pytest.fixture(scope="module")
def photo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu-store")
    build_photo_model(ModelStore(root))
    return root


@pytest.fixture(scope="module")
def gpu_and_cpu_servers(
    tmp_path_factory: pytest.TempPathFactory, photo_store: Path
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    redis = RedisProcess(free_port())
    redis.start()
    tmp = tmp_path_factory.mktemp("gpu-servers")
    servers: list[ServerProcess] = []
    try:
        for device in ("cuda", "cpu"):
            servers.append(
                start_server(tmp, photo_store, device=device, redis_url=redis.url, models="")
            )
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()
        redis.stop()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def test_service_on_cuda_answers_as_the_cpu_service(
    gpu_and_cpu_servers: tuple[ServerProcess, ServerProcess],
) -> None:
    gpu, cpu = gpu_and_cpu_servers
    ready = httpx.get(gpu.url + "/readyz", timeout=10).json()
    assert ready["devices"] == {"photo@1": "cuda:0"}, ready
    assert httpx.get(cpu.url + "/readyz", timeout=10).json()["devices"] == {"photo@1": "cpu"}

    uploads = [_png(p) for p in photos().values()]
    with httpx.Client(timeout=60) as http:
        for body in uploads:
            files = {"image": ("photo.png", body, "image/png")}
            g = http.post(gpu.url + "/explain", files=files).json()
            c = http.post(cpu.url + "/explain", files=files).json()
            assert g["prediction"]["class_index"] == c["prediction"]["class_index"]
            # True float32 on both (PROTOPNET_ALLOW_TF32 is off), but summation orders
            # differ, and near a match the log activation magnifies d's last bits.
            gl = [t["logit"] for t in g["top_classes"]]
            cl = [t["logit"] for t in c["top_classes"]]
            np.testing.assert_allclose(gl, cl, rtol=2e-2, atol=2e-2)
            for sheet in g["scoring_sheets"]:
                own = sum(row["points"] for row in sheet["rows"])
                assert own == pytest.approx(sheet["own_total"], rel=1e-4, abs=1e-4)
                total = sheet["own_total"] + sheet["other_total"]
                assert total == pytest.approx(sheet["logit"], rel=1e-4, abs=1e-4)
            png = http.get(gpu.url + g["prototypes"][0]["heatmap"]["overlay"])
            assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_concurrent_requests_on_cuda_are_batched_and_each_gets_its_own_answer(
    gpu_and_cpu_servers: tuple[ServerProcess, ServerProcess],
) -> None:
    """32 different images from 16 clients at once: the GPU server batches them, and
    each answer is that image's (the CPU server, asked one at a time, agrees)."""
    gpu, cpu = gpu_and_cpu_servers
    rng = np.random.default_rng(0)
    base = list(photos().values())
    uploads = []
    for i in range(32):  # different bytes and pixels each: none is answered from the cache
        img = base[i % len(base)].copy()
        img[rng.integers(0, img.shape[0], 200), rng.integers(0, img.shape[1], 200)] = 255
        uploads.append(_png(img))

    def explain(url: str, body: bytes) -> dict:
        r = httpx.post(url + "/explain", files={"image": ("p.png", body, "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    before = httpx.get(gpu.url + "/metrics", timeout=10).text
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda b: explain(gpu.url, b), uploads))
    after = httpx.get(gpu.url + "/metrics", timeout=10).text
    images = metric_value(after, "protopnet_batch_size_sum") - metric_value(
        before, "protopnet_batch_size_sum"
    )
    batches = metric_value(after, "protopnet_batch_size_count") - metric_value(
        before, "protopnet_batch_size_count"
    )
    assert images == 32 and batches < 32, (images, batches)
    for t, body in zip(together, uploads, strict=True):
        alone = explain(cpu.url, body)
        assert t["image"]["sha256"] == alone["image"]["sha256"]
        assert t["prediction"]["class_index"] == alone["prediction"]["class_index"]
        np.testing.assert_allclose(
            [c["logit"] for c in t["top_classes"]],
            [c["logit"] for c in alone["top_classes"]],
            rtol=2e-2,
            atol=2e-2,
        )
