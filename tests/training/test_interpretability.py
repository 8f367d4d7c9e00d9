"""The prototypes' quality figures published with a trained model, against the store's
own files and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from protopnet.quality import BACKGROUND_STD
from training.config import validate_config
from training.data import build_splits


@pytest.mark.slow
def test_export_publishes_the_prototypes_quality(parts_run) -> None:  # type: ignore[no-untyped-def]
    loaded = ModelStore(parts_run.store).load("parts")
    m = loaded.manifest
    q = m.interpretability
    assert q is not None
    P = loaded.model.num_prototypes
    assert q.prototypes == P == len(q.per_prototype)
    cfg = validate_config(
        {k: v for k, v in m.training_config.items() if k not in ("checkpoint", "run_dir")}
    )
    train = build_splits(cfg.data, cfg.train.seed).train
    # Duplicates by brute force: an earlier prototype on the same source patch.
    recs = m.prototypes
    for j, row in enumerate(q.per_prototype):
        same = [
            i
            for i in range(j)
            if (recs[i].source_image_id, recs[i].patch_hw)
            == (recs[j].source_image_id, recs[j].patch_hw)
            or bool((loaded.model.prototype_vectors[i] == loaded.model.prototype_vectors[j]).all())
        ]
        assert row.duplicate_of == (same[0] if same else None)
    assert q.unique_prototypes + q.duplicates == P
    # Background: the stored patch picture's luminance std, by hand.
    for row in q.per_prototype:
        png = loaded.prototype_image(row.index, "patch")
        assert png is not None
        rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255
        std = float((0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).std())
        assert row.patch_std == pytest.approx(std, abs=1e-4)
        # Off the object: the source box shares no pixel with the source image's part box.
        rec = recs[row.index]
        i = next(i for i in range(len(train)) if train.image_id(i) == rec.source_image_id)
        px0, py0, px1, py1 = train.part_box(i)
        bx0, by0, bx1, by1 = rec.box
        off = not (bx0 < px1 and px0 < bx1 and by0 < py1 and py0 < by1)
        assert row.off_object == off
        assert row.background == (std < BACKGROUND_STD or off)
    assert q.background_prototypes == sum(bool(r.background) for r in q.per_prototype)
    # Sparsity from the published weights.
    w = loaded.model.last_layer.weight.detach().abs()
    classes = loaded.model.prototype_class_identity.argmax(dim=1)
    own = float(w[classes, range(P)].sum() / w.sum())
    assert q.sparsity == pytest.approx(own, abs=1e-6)
    # The synthetic set has part boxes: consistency and stability both measured, on every
    # test image (80 < 400), each prototype on its class's 20.
    assert q.images == 80 and q.measured_on == "test split, 80 images"
    assert all(r.images == 20 for r in q.per_prototype)
    assert q.consistency is not None and 0 <= q.consistency <= 1
    assert q.stability is not None and 0 <= q.stability <= 1
    assert all(r.part_share is not None for r in q.per_prototype)


def test_nearest_training_patches_against_one_image_at_a_time() -> None:
    from protopnet.preprocess import eval_transform, to_model_mode
    from tests.protopnet.scenes import texture_model
    from training.config import load_config
    from training.export import nearest_training_patches

    # Three batches of 16: the running top-k merges across them.
    cfg = load_config(
        "synthetic", ["data.synthetic.train_per_class=12", "train.eval_batch_size=16"]
    )
    splits = build_splits(cfg.data, cfg.train.seed)
    model = texture_model()
    prep = cfg.model.preprocessing()
    dist, idx, maps, sample = nearest_training_patches(
        model, splits, prep, cfg, torch.device("cpu"), k=3
    )
    tf = eval_transform(prep)
    with torch.no_grad():
        per_image = torch.stack(
            [
                model.distances(model.conv_features(tf(to_model_mode(sample.load(i), prep))[None]))[
                    0
                ]
                for i in range(len(sample))
            ]
        )  # (N, P, H', W')
    best = per_image.flatten(2).min(dim=2).values  # (N, P)
    for j in range(model.num_prototypes):
        want = best[:, j].argsort()[:3]
        assert idx[j].tolist() == want.tolist()
        torch.testing.assert_close(dist[j], best[want, j])
        torch.testing.assert_close(maps[j], per_image[want, j])
