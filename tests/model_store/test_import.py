"""import-reference: reference-format checkpoints become store versions with equal outputs."""

from __future__ import annotations

import collections
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model_store import ModelStore, PublishError, UnsafePickleError
from model_store.importer import import_reference, read_reference_weights
from protopnet.errors import UnknownNameError, WeightsError
from protopnet.preprocess import eval_transform

from .conftest import IMG, tiny_model
from .reference_format import ReferencePPNet


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(model: torch.nn.Module, path: Path, form: str) -> Path:
    """Save a state_dict the ways the reference code and its users do."""
    state = _state(model)
    if form == "pth":
        torch.save(state, path)
    elif form == "data_parallel":  # saved from nn.DataParallel: every key starts "module."
        torch.save(collections.OrderedDict((f"module.{k}", v) for k, v in state.items()), path)
    elif form == "legacy":  # torch < 1.6 file format
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif form == "wrapped":
        torch.save({"state_dict": state, "epoch": torch.tensor(30)}, path)
    elif form == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file(state, str(path))
    return path


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        la, da = a(x)
        lb, db = b(x)
    assert torch.equal(la, lb)
    assert torch.equal(da, db)


REF_IMG = 64  # VGG-11's five pools: 64 px -> a 2 x 2 latent grid


@pytest.fixture(scope="module")
def reference_net() -> ReferencePPNet:
    return ReferencePPNet(seed=3).eval()


def _ref_batch() -> torch.Tensor:
    return torch.rand(3, 3, REF_IMG, REF_IMG, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("form", ["pth", "data_parallel", "legacy", "wrapped", "safetensors"])
def test_imported_model_gives_the_reference_networks_logits(
    store: ModelStore, tmp_path: Path, reference_net: ReferencePPNet, form: str
) -> None:
    """A checkpoint in the reference's key names and shapes, from a network written the
    reference's way (not this project's classes), in each form users save it in: the
    version in the store gives that network's own logits."""
    path = _save(reference_net, tmp_path / "ref.pth", form)
    result = import_reference(
        store, path, "ref", backbone="vgg11", class_names=["a", "b", "c"], img_size=REF_IMG
    )
    assert result.manifest.source == "import-reference"
    assert result.without_images == list(range(6))
    loaded = store.load("ref")
    x = _ref_batch()
    with torch.no_grad():
        want = reference_net(x).float()
        got, _ = loaded.model.eval()(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    arch = loaded.manifest.architecture
    assert (arch.num_classes, arch.num_prototypes, arch.prototype_depth) == (3, 6, 32)
    assert arch.add_on == "regular"
    assert arch.classes_of_prototypes() == [0, 0, 1, 1, 2, 2]  # contiguous P / K blocks
    assert store.aliases("ref") == {"latest": "1"}


def test_a_version_that_does_not_reproduce_the_checkpoint_is_refused_and_removed(
    store: ModelStore, tmp_path: Path, reference_net: ReferencePPNet, monkeypatch
) -> None:
    path = _save(reference_net, tmp_path / "ref.pth", "pth")
    real_load = ModelStore.load

    def damaged(self: ModelStore, ref: str) -> Any:  # the artifact as a bad write left it
        loaded = real_load(self, ref)
        with torch.no_grad():
            loaded.model.last_layer.weight[0, 0] += 1.0
        return loaded

    monkeypatch.setattr(ModelStore, "load", damaged)
    with pytest.raises(PublishError, match=r"differ by up to .*last_layer\.weight.*removed"):
        import_reference(
            store, path, "ref", backbone="vgg11", class_names=list("abc"), img_size=REF_IMG
        )
    assert store.list() == []  # nothing of the import is left


def test_shapes_and_depth_of_add_on_come_from_the_tensors(
    store: ModelStore, tmp_path: Path, batch: torch.Tensor
) -> None:
    # tiny_cnn ends with 16 channels; D = 4 makes a two-block bottleneck (16 -> 8 -> 4).
    source = tiny_model(
        seed=4,
        prototype_depth=4,
        prototype_size=(2, 2),
        activation="linear",
        num_classes=2,
        prototypes_per_class=3,
    )
    path = _save(source, tmp_path / "ref.pth", "pth")
    import_reference(
        store, path, "deep", backbone="tiny_cnn", class_names=["x", "y"], img_size=IMG,
        activation="linear",
    )  # fmt: skip
    loaded = store.load("deep")
    arch = loaded.manifest.architecture
    assert (arch.add_on, arch.prototype_depth, arch.prototype_size) == ("bottleneck", 4, (2, 2))
    _same_outputs(source, loaded.model, batch)


def test_whole_model_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (open, (str(marker), "w"))  # would create the marker file when unpickled

    path = tmp_path / "evil.pth"
    torch.save({"prototype_vectors": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(UnsafePickleError, match=r"would run code.*--trust-pickle"):
        read_reference_weights(path)
    assert not marker.exists()
    # The payload is real: trusting the file runs it (and then finds no state_dict).
    with pytest.raises(WeightsError, match="non-tensor entries"):
        read_reference_weights(path, trust_pickle=True)
    assert marker.exists()


def test_trusted_whole_model_pickle_imports(
    store: ModelStore, tmp_path: Path, reference_net: ReferencePPNet
) -> None:
    path = tmp_path / "whole.pth"
    torch.save(reference_net, path)  # what the reference's save_model_w_condition writes
    kw: dict[str, Any] = dict(backbone="vgg11", class_names=list("abc"), img_size=REF_IMG)
    with pytest.raises(UnsafePickleError):
        import_reference(store, path, "w", **kw)
    assert store.list() == []
    import_reference(store, path, "w", trust_pickle=True, **kw)
    x = _ref_batch()
    with torch.no_grad():
        got, _ = store.load("w").model.eval()(x)
        want = reference_net(x).float()
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"backbone": "resnet18"}, WeightsError, r"does not fit a resnet18 ProtoPNet.*missing"),
        ({"backbone": "vgg99"}, UnknownNameError, r"unknown backbone 'vgg99'; valid: .*vgg19"),
        ({"class_names": ["a", "b"]}, PublishError, "2 class names for a checkpoint with 3"),
        ({"class_names": None}, PublishError, "class names are needed"),
        ({"add_on": "regular"}, WeightsError, r"does not fit .* regular add-on layers"),
        ({"images_dir": "/nonexistent"}, PublishError, "image folder '/nonexistent' does not"),
        (
            {"images_dir": "/nonexistent", "class_names": None},
            PublishError,
            "image folder '/nonexistent' does not",
        ),
    ],
)
def test_bad_imports_say_what_is_wrong(
    store: ModelStore, tmp_path: Path, kwargs: dict, error: type, message: str
) -> None:
    source = tiny_model(seed=0, prototype_depth=4)  # bottleneck 16 -> 8 -> 4
    path = _save(source, tmp_path / "ref.pth", "pth")
    args: dict[str, Any] = {"backbone": "tiny_cnn", "class_names": list("abc"), "img_size": IMG}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        import_reference(store, path, "bad", **args)
    assert store.list() == []


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "notes.pth"
    junk.write_bytes(b"these are not weights" * 20)
    with pytest.raises(WeightsError, match=r"notes\.pth"):
        read_reference_weights(junk)
    with pytest.raises(WeightsError, match="has no 'prototype_vectors'"):
        torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "cnn.pth")
        from model_store.importer import infer_architecture

        infer_architecture(read_reference_weights(tmp_path / "cnn.pth"), "tiny_cnn")


# ---------------------------------------------------------------------------------------
# Push-free pictures from a training folder


def _photo_folder(root: Path) -> dict[str, list[np.ndarray]]:
    """class folders of small crops of real photographs; class "c" is left empty."""
    from skimage import data

    pics = {"a": [data.chelsea(), data.astronaut()], "b": [data.coffee(), data.rocket()]}
    out: dict[str, list[np.ndarray]] = {}
    for cls, photos in pics.items():
        (root / cls).mkdir(parents=True)
        out[cls] = []
        for i, p in enumerate(photos):
            for s, size in enumerate([(40, 30), (24, 36)]):
                img = Image.fromarray(p).resize(size)
                img.save(root / cls / f"{i}_{s}.png")
                out[cls].append(np.asarray(img))
    (root / "c").mkdir()
    return out


def test_pictures_come_from_each_prototypes_nearest_same_class_patch(
    store: ModelStore, tmp_path: Path
) -> None:
    source = tiny_model(seed=6)
    path = _save(source, tmp_path / "ref.pth", "pth")
    images = tmp_path / "train"
    _photo_folder(images)
    result = import_reference(
        store, path, "pics", backbone="tiny_cnn", img_size=IMG, images_dir=images, batch_size=3
    )
    assert result.images_seen == 8
    assert result.manifest.class_names == ["a", "b", "c"]  # the folders, sorted
    assert result.without_images == [4, 5]  # class "c" has no image
    loaded = store.load("pics")
    prep = loaded.manifest.preprocessing
    model = loaded.model
    maps = loaded.activation_maps()
    assert maps is not None
    for rec in loaded.manifest.prototypes[:4]:
        cls = loaded.manifest.class_names[rec.class_index]
        # Brute force: every image of the prototype's class, one at a time.
        best = (float("inf"), "", (0, 0))
        for f in sorted((images / cls).iterdir()):
            x = eval_transform(prep)(Image.open(f))[None]
            with torch.no_grad():
                d = model.forward_full(x).distances[0, rec.index]  # (H', W')
            v = float(d.min())
            if v < best[0]:
                best = (v, f"{cls}/{f.name}", divmod(int(d.argmin()), d.shape[1]))
        assert rec.source_path == best[1]
        assert rec.source_path.split("/")[0] == cls  # its own class
        assert rec.distance == pytest.approx(best[0], abs=1e-6)
        assert rec.patch_hw == best[2]
        w, h = Image.open(images / rec.source_path).size
        assert rec.source_size == (w, h)
        x0, y0, x1, y1 = rec.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        src = Image.open(loaded.prototype_image(rec.index, "source"))
        patch = Image.open(loaded.prototype_image(rec.index, "patch"))
        assert src.size == (w, h) and patch.size == (x1 - x0, y1 - y0)
        # The stored map is the prototype's similarity over its own source image.
        x = eval_transform(prep)(Image.open(images / rec.source_path))[None]
        with torch.no_grad():
            sim = model.similarity(model.forward_full(x).distances[0, rec.index])
        assert torch.allclose(maps[rec.index], sim, atol=1e-5)
    for j in (4, 5):
        assert not loaded.manifest.prototypes[j].has_images
        assert loaded.prototype_image(j, "patch") is None


def test_unknown_class_folder_names_the_valid_classes(store: ModelStore, tmp_path: Path) -> None:
    path = _save(tiny_model(seed=0), tmp_path / "ref.pth", "pth")
    images = tmp_path / "train"
    (images / "dog").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, "PNG")
    (images / "dog" / "x.png").write_bytes(buf.getvalue())
    with pytest.raises(UnknownNameError, match=r"unknown class folder 'dog'; valid: a, b, c"):
        import_reference(
            store, path, "p", backbone="tiny_cnn", class_names=list("abc"), img_size=IMG,
            images_dir=images,
        )  # fmt: skip


def test_an_import_with_images_calibrates_familiarity_on_held_out_ones(
    store: ModelStore, tmp_path: Path
) -> None:
    from skimage import data

    source = tiny_model(seed=7)
    path = _save(source, tmp_path / "ref.pth", "pth")
    images = tmp_path / "train"
    rng = np.random.default_rng(0)
    for cls, photo in {"a": data.chelsea(), "b": data.coffee(), "c": data.astronaut()}.items():
        (images / cls).mkdir(parents=True)
        for i in range(10):
            y, x = (int(v) for v in rng.integers(0, 200, 2))
            Image.fromarray(photo[y : y + 60, x : x + 60]).save(images / cls / f"{i:02d}.png")
    result = import_reference(
        store, path, "fam", backbone="tiny_cnn", img_size=IMG, images_dir=images
    )
    assert result.familiarity_skipped is None
    info = result.manifest.familiarity
    assert info is not None and info.fitted_images == 24 and info.calibration_images == 6
    fam = store.load("fam").familiarity()
    assert fam is not None
    # Brute force: the held-out images are every 5th of the sorted folder listing.
    files = sorted(images.glob("*/*.png"))
    prep = result.manifest.preprocessing
    held = torch.stack([eval_transform(prep)(Image.open(f)) for f in files[4::5]])
    with torch.no_grad():
        want = fam.scorer().scores(source.conv_features(held)).sort().values.float()
    assert torch.allclose(fam.validation_scores, want, atol=1e-4)


def test_an_import_with_too_few_images_says_why_it_has_no_familiarity(
    store: ModelStore, tmp_path: Path
) -> None:
    path = _save(tiny_model(seed=6), tmp_path / "ref.pth", "pth")
    _photo_folder(tmp_path / "train")
    result = import_reference(
        store, path, "few", backbone="tiny_cnn", img_size=IMG, images_dir=tmp_path / "train"
    )
    assert result.manifest.familiarity is None
    assert (
        result.familiarity_skipped is not None and "need more than 8" in result.familiarity_skipped
    )
