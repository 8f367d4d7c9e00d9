"""Push (prototype projection): each prototype becomes its nearest training patch.

Class-specific and exact: prototype j of class k is replaced by the closest latent patch
among all (unaugmented) training images of class k. One batched forward pass under
``torch.inference_mode`` streams every image through ``NearestPatchSearch``; images come
from a DataLoader. Only the winning source images are kept (their latent maps, so each
prototype's self-activation map is computed with its projected vector) and only they are
loaded again at the end for the boxes and pictures.

A class with no training image leaves its prototypes without a patch: that is an error
naming the classes, never a silently unprojected prototype.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from model_store import PrototypeRecord, PrototypeVisuals
from protokit.threads import use_torch_threads
from protopnet.config import Preprocessing
from protopnet.errors import ProtoPNetError
from protopnet.explain import source_boxes
from protopnet.model import ProtoPNet, patch_columns
from protopnet.preprocess import eval_transform, to_model_mode
from protopnet.push import NearestPatches, NearestPatchSearch
from training.data import ImageSet, TransformedImages


class PushError(ProtoPNetError):
    """Push could not project every prototype (e.g. a class without training images)."""


@dataclass
class PushResult:
    """What push produced, one entry per prototype (index = row of prototype_vectors)."""

    records: list[PrototypeRecord]
    activation_maps: torch.Tensor  # (P, H', W') similarity of prototype j on its source
    visuals: dict[int, PrototypeVisuals] = field(default_factory=dict)
    image_indices: list[int] = field(default_factory=list)  # into the pushed ImageSet
    images_seen: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    precision: str = "fp32"  # the trunk's in the search ("bf16" only where it can pay)

    @property
    def prototypes_per_second(self) -> float:
        return len(self.records) / max(self.seconds, 1e-9)


def self_distance_maps(latents: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Distance map of prototype j over its own source image's latent map, for all j.

    latents: (J, D, H, W), prototypes: (J, D, h1, w1) -> (J, H', W'). As in
    ``l2_distances``, the cross term is a (batched) matrix product, so it stays true
    float32 on a GPU where cuDNN would run a convolution in TF32.
    """
    J, _, H, W = latents.shape
    _, _, h1, w1 = prototypes.shape
    cols = patch_columns(latents, h1, w1)  # (J, K, L)
    flat = prototypes.reshape(J, 1, -1)  # (J, 1, K)
    z2 = (cols * cols).sum(dim=1, keepdim=True)  # (J, 1, L)
    p2 = (flat * flat).sum(dim=2, keepdim=True)  # (J, 1, 1)
    d = F.relu(z2 - 2 * torch.bmm(flat, cols) + p2)  # (J, 1, L)
    return d.view(J, H - h1 + 1, W - w1 + 1)


# On the CPU the trunk runs a loader batch a few images at a time: about this many input
# pixels per call (4 images at 224 px, 256 at 28 px). At 25 x 224 px each VGG block's
# output is 320 MB, which the allocator maps and faults in afresh for every batch; in
# small pieces it reuses its memory. Push over 200 images at 224 px is about 5 % faster
# on a 2-core CPU (bench.push). On a GPU the whole batch goes at once.
CPU_TRUNK_PIXELS = 4 * 224 * 224


def trunk_chunks(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` split into the pieces one trunk call takes (one piece on a GPU)."""
    if x.device.type != "cpu":
        return [x]
    per_call = max(1, CPU_TRUNK_PIXELS // (x.shape[-2] * x.shape[-1]))
    return list(x.split(per_call))


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's first spatial convolution holds channels-last weights."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1):
            return m.weight.is_contiguous(memory_format=torch.channels_last)
    return False


@contextlib.contextmanager
def _channels_last(model: ProtoPNet, enabled: bool) -> Iterator[None]:
    """Run convolutions in channels-last layout; the model's layout is restored afterwards.

    Must be entered outside inference mode, so the parameters stay normal tensors.
    """
    if not enabled or is_channels_last(model):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


class _Scan:
    """One pass of images through the model into a nearest-patch search; keeps the
    latent maps of the images that are some prototype's nearest (on the CPU)."""

    def __init__(
        self,
        model: ProtoPNet,
        search: NearestPatchSearch,
        device: torch.device,
        channels_last: bool,
        bf16: bool,
        chosen: torch.Tensor | None = None,  # (P,) the only image each prototype may take
    ):
        self.model, self.search, self.device = model, search, device
        self.channels_last = channels_last
        self.chosen = None if chosen is None else chosen.to(device).view(1, -1)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else None

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D, H, W) float32, the trunk a few images at a time."""
        zs = []
        for piece in trunk_chunks(x):
            if self.amp is not None:
                with self.amp:
                    f = self.model.features(piece)
                zs.append(self.model.add_on_layers(f.float()))
            else:
                zs.append(self.model.conv_features(piece))
        return torch.cat(zs).float().contiguous()

    def run(self, batches: Iterable, progress: bool) -> dict[int, torch.Tensor]:
        winners: dict[int, torch.Tensor] = {}  # image index -> latent map (D, H, W), CPU
        desc = "push (bf16 search)" if self.amp else "push"
        if self.chosen is not None:
            desc = "push (float32 on the chosen images)"
        for x, y, idx in tqdm(batches, desc=desc, leave=False, disable=not progress):
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y, idx = y.to(self.device), idx.to(self.device)
            z = self.latents(x)
            d = self.model.distances(z)  # (B, P, H', W')
            eligible = None if self.chosen is None else idx.view(-1, 1) == self.chosen
            self.search.update(d, z, y, idx, eligible)
            # Keep the latent maps of images that are currently somebody's nearest.
            wanted = set(self.search.result().image_index.cpu().tolist())
            for b, i in enumerate(idx.cpu().tolist()):
                if i in wanted and i not in winners:
                    winners[i] = z[b].cpu().clone()
            for i in [i for i in winners if i not in wanted]:
                del winners[i]
        return winners


def push_prototypes(
    model: ProtoPNet,
    images: ImageSet,
    preprocessing: Preprocessing,
    batch_size: int = 75,
    num_workers: int = 0,
    device: torch.device | None = None,
    precision: str = "fp32",
    channels_last: bool = True,
    visualize: bool = True,
    progress: bool = False,
) -> PushResult:
    """Project every prototype onto its nearest own-class training patch, in place.

    ``images`` must be the training images (unaugmented: the eval transform of
    ``preprocessing`` is applied). The default, ``precision="fp32"``, is exact.
    ``precision="bf16"`` searches with a bfloat16 trunk (the trunk about 1.9x faster on
    CPUs with AVX512-BF16; push as a whole 1.2-1.5x, bench.push), then runs the images it chose again in float32 and takes each
    prototype's patch, distance and vector there: every prototype is exactly a float32
    patch of its recorded source image, but near-ties between images may be decided
    differently than in float32. It pays when there are many more training images than
    prototypes (the second pass runs at most one image per prototype); with fewer than
    two images per prototype, push runs in float32 instead (``PushResult.precision``).
    Returns the provenance records, self-activation maps and (optionally) pictures.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown push precision {precision!r}; valid: bf16, fp32")
    start = time.perf_counter()
    device = device or model.prototype_vectors.device
    names = images.class_names
    classes = model.prototype_classes.cpu()  # (P,)
    missing_classes = sorted(set(classes.tolist()) - set(images.labels))
    if missing_classes:
        raise PushError(
            "push: classes with prototypes but no training image: "
            + ", ".join(f"{k} ({names[k]!r})" for k in missing_classes[:20])
        )
    P, D, h1, w1 = model.prototype_vectors.shape
    if precision == "bf16" and len(images) < 2 * P:
        # The float32 pass after it may take up to one image per prototype: with fewer
        # than two images per prototype, the two passes cost more than float32 alone.
        precision = "fp32"
    dataset = TransformedImages(images, eval_transform(preprocessing))

    def loader(ds: Dataset) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )

    was_training = model.training
    model.eval()
    fwd_start = time.perf_counter()
    with _channels_last(model, channels_last), torch.inference_mode():
        search = NearestPatchSearch(classes.to(device), (D, h1, w1))
        scan = _Scan(model, search, device, channels_last, bf16=precision == "bf16")
        winners = scan.run(loader(dataset), progress)
        if precision == "bf16":
            # The bfloat16 trunk chose each prototype's source image. Its patch there,
            # its distance and the vector it becomes are taken again in float32 from
            # that image alone, so the prototype IS a float32 training patch (the
            # service computes in float32) and peaks on it.
            chosen = search.result().image_index
            exact = NearestPatchSearch(classes.to(device), (D, h1, w1))
            rescan = _Scan(model, exact, device, channels_last, bf16=False, chosen=chosen)
            winners = rescan.run(loader(Subset(dataset, sorted(winners))), progress)
            search = exact
    forward_seconds = time.perf_counter() - fwd_start
    model.train(was_training)
    res = search.result()
    missing = res.missing()
    if missing:
        ks = sorted({int(classes[j]) for j in missing})
        raise PushError(
            f"push: {len(missing)} prototypes found no patch; their classes have no "
            f"training image: {', '.join(f'{k} ({names[k]!r})' for k in ks[:20])}"
        )
    vectors = res.vector.detach().clone()  # (P, D, h1, w1); a normal tensor, not inference
    with torch.no_grad():
        model.prototype_vectors.copy_(vectors.to(model.prototype_vectors.dtype))

    # Self-activation maps: each projected prototype against its own source image.
    src = res.image_index.cpu().tolist()  # (P,)
    maps = []
    with torch.inference_mode():
        for s in range(0, P, 256):
            js = list(range(s, min(P, s + 256)))
            lat = torch.stack([winners[src[j]] for j in js]).to(device)  # (J, D, H, W)
            d = self_distance_maps(lat, vectors[js].to(device))  # (J, H', W')
            maps.append(model.similarity(d).float().cpu())
    sim_maps = torch.cat(maps)  # (P, H', W')

    records, visuals = _records_and_visuals(
        model, images, preprocessing, res, sim_maps, src, visualize
    )
    return PushResult(
        records=records,
        activation_maps=sim_maps,
        visuals=visuals,
        image_indices=src,
        images_seen=len(images),
        seconds=time.perf_counter() - start,
        forward_seconds=forward_seconds,
        precision=precision,
    )


def source_rgb(images: ImageSet, i: int, prep: Preprocessing) -> np.ndarray:
    """The source image as the model saw it before resizing: (H, W, 3) uint8 RGB."""
    return np.asarray(to_model_mode(images.load(i), prep), dtype=np.uint8)


def _draw_source(
    images: ImageSet,
    i: int,
    js: list[int],
    maps: torch.Tensor,
    prep: Preprocessing,
    visualize: bool,
) -> tuple[tuple[int, int], list[tuple[int, int, int, int]], list[PrototypeVisuals]]:
    """Boxes (and pictures) of prototypes ``js`` on their common source image ``i``."""
    rgb = source_rgb(images, i, prep)
    H, W = rgb.shape[:2]
    canvas, boxes = source_boxes(maps[js], (W, H), prep)  # (J, H, W), (J, 4)
    box_list = [(int(b[0]), int(b[1]), int(b[2]), int(b[3])) for b in boxes.tolist()]
    pictures = []
    if visualize:
        for n, box in enumerate(box_list):
            pictures.append(PrototypeVisuals.draw(rgb, box, canvas[n].cpu().numpy()))
    return (W, H), box_list, pictures


def _draw_all(
    images: ImageSet,
    by_image: dict[int, list[int]],
    maps: torch.Tensor,
    prep: Preprocessing,
    visualize: bool,
) -> dict[int, tuple[tuple[int, int], tuple[int, int, int, int], PrototypeVisuals | None]]:
    """Per prototype: source size, box and pictures. Each source image is loaded once;
    images are drawn on a few threads (OpenCV and torch release the GIL)."""
    workers = max(1, min(4, os.cpu_count() or 1, len(by_image)))
    items = list(by_image.items())
    # Single-threaded torch on the drawing threads (protokit.threads).
    with ThreadPoolExecutor(workers, initializer=use_torch_threads, initargs=(1,)) as pool:
        drawn = list(
            pool.map(
                lambda item: _draw_source(images, item[0], item[1], maps, prep, visualize), items
            )
        )
    out: dict[int, tuple[tuple[int, int], tuple[int, int, int, int], PrototypeVisuals | None]] = {}
    for (_, js), (size, boxes, pictures) in zip(items, drawn, strict=True):
        for n, j in enumerate(js):
            out[j] = (size, boxes[n], pictures[n] if visualize else None)
    return out


def _records_and_visuals(
    model: ProtoPNet,
    images: ImageSet,
    prep: Preprocessing,
    res: NearestPatches,
    sim_maps: torch.Tensor,
    src: list[int],
    visualize: bool,
) -> tuple[list[PrototypeRecord], dict[int, PrototypeVisuals]]:
    """Provenance records, boxes and pictures of every prototype."""
    classes = model.prototype_classes.cpu().tolist()
    by_image: dict[int, list[int]] = {}
    for j, i in enumerate(src):
        by_image.setdefault(i, []).append(j)
    drawn = _draw_all(images, by_image, sim_maps, prep, visualize)
    distance = res.distance.cpu().tolist()
    patch_hw = res.patch_hw.cpu().tolist()
    records: list[PrototypeRecord] = []
    visuals: dict[int, PrototypeVisuals] = {}
    for j, i in enumerate(src):
        size, box, pictures = drawn[j]
        records.append(
            PrototypeRecord(
                index=j,
                class_index=int(classes[j]),
                source_image_id=images.image_id(i),
                source_path=images.image_path(i),
                source_size=size,
                patch_hw=(int(patch_hw[j][0]), int(patch_hw[j][1])),
                distance=float(distance[j]),
                box=box,
                has_images=visualize,
            )
        )
        if pictures is not None:
            visuals[j] = pictures
    return records, visuals


def render_visuals(
    records: list[PrototypeRecord],
    activation_maps: torch.Tensor,
    images: ImageSet,
    prep: Preprocessing,
) -> dict[int, PrototypeVisuals]:
    """Pictures of prototypes from saved records (e.g. a checkpoint being exported).

    Source images are found by their id in ``images``; a record whose image is not
    there is an error naming it.
    """
    index_of = {images.image_id(i): i for i in range(len(images))}
    by_image: dict[int, list[int]] = {}
    for r in records:
        if r.source_image_id not in index_of:
            raise PushError(
                f"prototype {r.index}: source image {r.source_image_id!r} is not in the "
                f"training set ({len(images)} images)"
            )
        by_image.setdefault(index_of[r.source_image_id], []).append(r.index)
    drawn = _draw_all(images, by_image, activation_maps, prep, True)
    return {j: pictures for j, (_, _, pictures) in drawn.items() if pictures is not None}
