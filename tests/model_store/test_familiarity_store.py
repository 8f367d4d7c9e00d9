"""A version's familiarity score in the store: published, described in the manifest,
loaded back exactly; absent from older or uncalibrated versions; checked at publish."""

from __future__ import annotations

import json

import pytest
import torch

from model_store import ModelStore, PublishError

from .conftest import prototype_artifacts, publish_tiny, tiny_familiarity, tiny_model


def test_the_familiarity_score_round_trips_through_the_store(store: ModelStore) -> None:
    model, manifest = publish_tiny(store)
    want = tiny_familiarity(model)
    info = manifest.familiarity
    assert info is not None and info.method == "latent-mahalanobis"
    assert info.fitted_images == 40 and info.calibration_images == 10
    assert info.percentiles["p50"] == pytest.approx(want.summary()["p50"])
    got = store.load("tiny").familiarity()
    assert got is not None
    for k, v in want.tensors().items():
        assert torch.equal(got.tensors()[k], v), k
    assert got.fitted_on == "training split" and got.calibrated_on == "validation split"
    on_disk = json.loads((store.root / "tiny" / "1" / "manifest.json").read_text())
    assert "familiarity.safetensors" in on_disk["files"]


def test_a_version_without_calibration_loads_with_none(store: ModelStore) -> None:
    model = tiny_model(0)
    store.publish("plain", model, **prototype_artifacts(model))
    loaded = store.load("plain")
    assert loaded.manifest.familiarity is None and loaded.familiarity() is None


def test_a_score_of_another_latent_depth_is_refused_at_publish(store: ModelStore) -> None:
    model = tiny_model(0)
    other = tiny_familiarity(tiny_model(0, prototype_depth=4))
    with pytest.raises(PublishError, match=r"4-channel features.*have 8"):
        store.publish("bad", model, **prototype_artifacts(model), familiarity=other)
    assert not (store.root / "bad" / "1").exists()
