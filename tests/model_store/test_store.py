"""Publish, load, resolve, list, promote and remove through a real store on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_store import (
    InvalidNameError,
    ModelStore,
    PublishError,
    StoreError,
    VersionExistsError,
)
from model_store.store import DEFAULT_ALIAS
from protopnet.errors import UnknownNameError

from .conftest import photos, prototype_artifacts, publish_tiny, tiny_model


def test_round_trip_gives_identical_outputs(store: ModelStore, batch: torch.Tensor) -> None:
    model, manifest = publish_tiny(store)
    loaded = store.load("tiny")
    assert (loaded.manifest.name, loaded.manifest.version) == ("tiny", "1")
    assert not loaded.model.training
    assert next(loaded.model.parameters()).device.type == "cpu"
    with torch.no_grad():
        logits, min_d = model(batch)
        logits2, min_d2 = loaded.model(batch)
    assert torch.equal(logits, logits2)
    assert torch.equal(min_d, min_d2)
    # Every tensor of the state_dict came back bit for bit.
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert loaded.manifest.architecture == model.config
    assert loaded.manifest.class_names == ["class_0", "class_1", "class_2"]
    assert loaded.manifest == manifest


def test_manifest_records_what_was_published(store: ModelStore) -> None:
    model = tiny_model(0)
    args = prototype_artifacts(model)
    manifest = store.publish(
        "tiny",
        model,
        training_config={"epochs": 3, "lr": {"joint": 1e-4}},
        metrics={"val_accuracy": 0.81, "test_accuracy": 0.8, "loss": 0.3},
        **args,
    )
    on_disk = json.loads((store.root / "tiny" / "1" / "manifest.json").read_text())
    assert on_disk["training_config"] == {"epochs": 3, "lr": {"joint": 1e-4}}
    assert on_disk["metrics"]["val_accuracy"] == 0.81
    assert on_disk["metrics"]["loss"] == 0.3  # extra metrics are kept
    assert on_disk["architecture"]["backbone"] == "tiny_cnn"
    assert on_disk["preprocessing"]["img_size"] == 16
    assert on_disk["code_version"] != "unknown"
    assert on_disk["prototypes"][3]["box"] == list(args["prototypes"][3].box)
    assert all(p["has_images"] for p in on_disk["prototypes"])
    # Every file but the manifest pair is listed with its SHA-256.
    folder = store.root / "tiny" / "1"
    on_disk_files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk_files == set(manifest.files) | {"manifest.json", "manifest.sha256"}
    assert len(manifest.files) == 1 + 1 + 3 * model.num_prototypes


def test_prototype_images_are_the_published_pictures(store: ModelStore) -> None:
    model = tiny_model(0)
    args = prototype_artifacts(model)
    store.publish("tiny", model, **args)
    loaded = store.load("tiny@1")
    for j, vis in args["visuals"].items():
        for kind in ("patch", "source", "activation"):
            path = loaded.prototype_image(j, kind)
            assert path is not None and path.name == f"{j}_{kind}.png"
            got = np.asarray(Image.open(path).convert("RGB"))
            assert np.array_equal(got, getattr(vis, kind))  # PNG is lossless
            assert loaded.prototype_image_bytes(j, kind) == path.read_bytes()
    # The source picture is the photograph itself with one box drawn on it.
    src = np.asarray(Image.open(loaded.prototype_image(0, "source")).convert("RGB"))
    assert src.shape == photos()[0].shape
    maps = loaded.activation_maps()
    assert maps is not None and torch.equal(maps, args["activation_maps"])


def test_version_without_images_reports_them_absent(store: ModelStore) -> None:
    publish_tiny(store, with_images=False)
    loaded = store.load("tiny")
    assert loaded.prototype_image(0, "patch") is None
    assert loaded.activation_maps() is None
    assert not any(p.has_images for p in loaded.manifest.prototypes)
    with pytest.raises(UnknownNameError, match=r"unknown prototype image kind 'heatmap'.*patch"):
        loaded.prototype_image(0, "heatmap")  # type: ignore[arg-type]
    with pytest.raises(UnknownNameError, match=r"unknown prototype '6'; valid: 0\.\.5"):
        loaded.prototype_image(6, "patch")


def test_versions_count_up_and_latest_follows(store: ModelStore) -> None:
    publish_tiny(store, seed=0)
    publish_tiny(store, seed=1)
    m3 = publish_tiny(store, seed=2, aliases=("latest", "candidate"))[1]
    assert m3.version == "3"
    assert store.resolve("tiny") == ("tiny", "3")
    assert store.resolve("tiny@latest") == ("tiny", "3")
    assert store.resolve("tiny@2") == ("tiny", "2")
    assert store.resolve("tiny@candidate") == ("tiny", "3")
    [entry] = store.list()
    assert entry.name == "tiny"
    assert entry.versions == ["1", "2", "3"]
    assert entry.aliases == {"latest": "3", "candidate": "3"}


def test_loaded_versions_differ_by_their_weights(store: ModelStore, batch: torch.Tensor) -> None:
    m0, _ = publish_tiny(store, seed=0)
    m1, _ = publish_tiny(store, seed=1)
    with torch.no_grad():
        assert torch.equal(store.load("tiny@1").model(batch)[0], m0(batch)[0])
        assert torch.equal(store.load("tiny@2").model(batch)[0], m1(batch)[0])
        assert not torch.equal(m0(batch)[0], m1(batch)[0])


def test_unknown_names_list_the_valid_ones(store: ModelStore) -> None:
    publish_tiny(store)
    publish_tiny(store, name="other", aliases=("latest", "production"))
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope'; valid: other, tiny") as e:
        store.load("nope")
    assert (e.value.kind, e.value.name) == ("model", "nope")
    with pytest.raises(UnknownNameError, match=r"unknown version '7'; valid: 1, latest"):
        store.resolve("tiny@7")
    with pytest.raises(
        UnknownNameError, match=r"unknown alias 'prod'; valid: 1, latest, production"
    ):
        store.load("other@prod")
    with pytest.raises(InvalidNameError, match="nothing after '@'"):
        store.resolve("tiny@")
    with pytest.raises(UnknownNameError, match=r"unknown model '\.\./etc'"):
        store.resolve("../etc")


def test_empty_store_says_so(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "nothing-here")
    assert store.list() == []
    with pytest.raises(UnknownNameError, match=r"unknown model 'x'; valid: \(none\)"):
        store.load("x")


def test_default_root_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROTOPNET_STORE", str(tmp_path / "env-store"))
    assert ModelStore().root == (tmp_path / "env-store").resolve()
    monkeypatch.delenv("PROTOPNET_STORE")
    monkeypatch.chdir(tmp_path)
    assert ModelStore().root == (tmp_path / "store").resolve()


def test_explicit_versions_never_change(store: ModelStore) -> None:
    publish_tiny(store, version="2024-06-rc1")
    with pytest.raises(VersionExistsError, match=r"tiny@2024-06-rc1 already exists"):
        publish_tiny(store, seed=1, version="2024-06-rc1")
    # Nothing half-written is left behind by the refused publish.
    assert sorted(p.name for p in (store.root / "tiny").iterdir() if p.is_dir()) == ["2024-06-rc1"]
    assert publish_tiny(store, seed=1)[1].version == "1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"class_names": ["a", "b"]}, "2 class names for a model with 3 classes"),
        ({"class_names": ["a", "b", "a"]}, r"class names must be unique; repeated: \['a'\]"),
        ({"drop_record": True}, "5 prototype records for 6 prototypes"),
        ({"wrong_class": True}, "prototype 0 is recorded with class 2 but the model assigns"),
        ({"visual_key": 9}, r"visuals for prototypes \[9\] outside 0..5"),
        ({"visual_dtype": True}, r"visuals\[0\]\.patch must be a uint8 numpy array, got float32"),
        ({"maps_shape": True}, r"activation_maps must be \(P=6, H', W'\), got \(5, 8, 8\)"),
        ({"img_size": 32}, "preprocessing.img_size 32 differs from the architecture's img_size 16"),
        ({"training_config": {"f": object()}}, "training_config must be plain JSON data"),
    ],
)
def test_inconsistent_publish_is_refused_before_writing(
    store: ModelStore, change: dict, message: str
) -> None:
    model = tiny_model(0)
    args = prototype_artifacts(model)
    if "class_names" in change:
        args["class_names"] = change["class_names"]
    if "drop_record" in change:
        args["prototypes"] = args["prototypes"][:-1]
    if "wrong_class" in change:
        args["prototypes"][0] = args["prototypes"][0].model_copy(update={"class_index": 2})
    if "visual_key" in change:
        args["visuals"][9] = args["visuals"][0]
    if "visual_dtype" in change:
        v = args["visuals"][0]
        v.patch = v.patch.astype(np.float32)
    if "maps_shape" in change:
        args["activation_maps"] = args["activation_maps"][:5]
    if "img_size" in change:
        args["preprocessing"] = args["preprocessing"].model_copy(update={"img_size": 32})
    if "training_config" in change:
        args["training_config"] = change["training_config"]
    with pytest.raises(PublishError, match=message):
        store.publish("tiny", model, **args)
    assert store.list() == []
    assert not list((store.root / "tiny").glob(".publish-*"))


@pytest.mark.parametrize("bad", ["", "a/b", "../x", ".hidden", "a@b", "x" * 65, "sp ace"])
def test_bad_model_names_are_refused(store: ModelStore, bad: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid model name"):
        publish_tiny(store, name=bad)


def test_promote_moves_and_creates_aliases(store: ModelStore) -> None:
    for seed in range(3):
        publish_tiny(store, seed=seed)
    assert store.promote("tiny", "2", "production") == "2"
    assert store.resolve("tiny@production") == ("tiny", "2")
    assert store.promote("tiny", "1", "production") == "1"  # moved back
    assert store.resolve("tiny@production") == ("tiny", "1")
    assert store.promote("tiny", "latest", "staging") == "3"  # an alias as the target
    assert store.aliases("tiny") == {"latest": "3", "production": "1", "staging": "3"}
    with pytest.raises(UnknownNameError, match=r"unknown version '9'; valid: 1, 2, 3"):
        store.promote("tiny", "9", "production")
    with pytest.raises(InvalidNameError, match="all-digit names are reserved for versions"):
        store.promote("tiny", "1", "4")
    with pytest.raises(UnknownNameError, match="unknown model 'ghost'"):
        store.promote("ghost", "1", "production")
    assert store.aliases("tiny")["production"] == "1"


def test_remove_moves_latest_and_guards_pinned_aliases(store: ModelStore) -> None:
    for seed in range(3):
        publish_tiny(store, seed=seed)
    store.promote("tiny", "2", "production")
    with pytest.raises(StoreError, match=r"tiny@2 is aliased as production; move the alias"):
        store.remove("tiny", "2")
    assert store.remove("tiny", "3") == [DEFAULT_ALIAS]
    assert store.resolve("tiny") == ("tiny", "2")  # latest moved to the newest left
    with pytest.raises(UnknownNameError, match=r"unknown version '3'; valid: 1, 2"):
        store.load("tiny@3")
    assert store.remove("tiny", "2", force=True) == ["latest", "production"]
    assert store.aliases("tiny") == {"latest": "1"}
    # Numbers are never reused, so a cached "tiny@3" can never mean other weights.
    assert publish_tiny(store, seed=5)[1].version == "4"
    with pytest.raises(UnknownNameError, match=r"unknown version '8'; valid: 1, 4"):
        store.remove("tiny", "8")


def test_loading_never_unpickles(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    publish_tiny(store)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = store.load("tiny")
    assert loaded.activation_maps() is not None
    assert loaded.prototype_image_bytes(0, "patch") is not None


def test_numeric_versions_are_written_plainly(store: ModelStore) -> None:
    with pytest.raises(InvalidNameError, match=r"invalid version name '007'.*\(7\)"):
        publish_tiny(store, version="007")
    assert publish_tiny(store, version="7")[1].version == "7"
    assert publish_tiny(store)[1].version == "8"  # auto numbers continue after explicit ones


def test_remembered_resolutions_follow_every_change(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving replica resolves through its own ModelStore on every request and
    remembers the answers; a second store object (the CLI) publishes, promotes and
    removes, and each change must show up at the replica's very next resolve."""
    import model_store.store as store_module

    # Trust stat times at once (normally only after 2 s), so the cache is in play here.
    monkeypatch.setattr(store_module, "_RACY_NS", -(10**18))
    for seed in range(2):
        publish_tiny(store, seed=seed)
    cli, replica = store, ModelStore(store.root)
    cli.promote("tiny", "1", "production")
    assert replica.resolve("tiny@production") == ("tiny", "1")
    assert replica.resolve("tiny") == ("tiny", "2")
    assert set(replica._resolved) == {"tiny@production", "tiny"}  # remembered

    cli.promote("tiny", "2", "production")
    assert replica.resolve("tiny@production") == ("tiny", "2")
    publish_tiny(cli, seed=3)
    assert replica.resolve("tiny") == ("tiny", "3")
    cli.remove("tiny", "3")
    assert replica.resolve("tiny") == ("tiny", "2")
    with pytest.raises(UnknownNameError, match="unknown version '3'"):
        replica.resolve("tiny@3")


def test_fresh_changes_are_not_remembered(store: ModelStore) -> None:
    """Within the racy window (a change newer than the file system's timestamps can
    tell apart) every resolve reads the registry again."""
    publish_tiny(store, seed=0)
    assert store.resolve("tiny") == ("tiny", "1")
    assert "tiny" not in store._resolved
