"""The run configuration: shipped configs validate, typos are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from protopnet.errors import UnknownNameError
from training.config import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    shipped_configs,
    validate_config,
)
from training.engine import joint_lr_factor
from training.run import is_push_epoch, plan_units

CUB_BACKBONES = ["vgg16", "vgg19", "resnet34", "resnet152", "densenet121", "densenet161"]


def test_every_shipped_config_validates() -> None:
    names = shipped_configs()
    assert {"fashion_mnist", "synthetic", *(f"cub_{b}" for b in CUB_BACKBONES)} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.model.architecture(3).num_prototypes == 3 * cfg.model.prototypes_per_class


@pytest.mark.parametrize("backbone", CUB_BACKBONES)
def test_cub_configs_use_the_paper_setup(backbone: str) -> None:
    cfg = load_config(f"cub_{backbone}")
    assert cfg.data.kind == "cub"
    assert cfg.model.backbone == backbone
    assert cfg.model.img_size == 224
    assert cfg.model.prototypes_per_class == 10
    assert cfg.model.weights == "imagenet"
    assert cfg.train.warm_epochs == 5 and cfg.train.push_every == 10
    assert cfg.train.lr.joint_features == pytest.approx(1e-4)
    assert cfg.train.loss.clst == pytest.approx(0.8) and cfg.train.loss.sep == pytest.approx(-0.08)


def test_unknown_key_in_file_names_the_key_and_the_valid_ones(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ndata: {kind: synthetic}\ntrain: {epochz: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.epochz" in msg and "unknown key" in msg
    assert "epochs" in msg and "warm_epochs" in msg  # the valid keys of that section
    assert str(p) in msg


def test_unknown_key_from_the_command_line_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.prototypes_per_klass: unknown key"):
        load_config("synthetic", ["model.prototypes_per_klass=3"])
    with pytest.raises(ConfigError, match=r"bogus: unknown key"):
        load_config("synthetic", ["bogus.x=1"])


def test_bad_values_name_the_key_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: .*greater than or equal to 1.*got 0"):
        load_config("synthetic", ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"data\.kind: .*'imagefolder', 'cub', 'fashion_mnist'"):
        load_config("synthetic", ["data.kind=mnist"])
    with pytest.raises(ConfigError, match=r"unknown backbone 'vgg20'; valid: .*vgg19"):
        load_config("synthetic", ["model.backbone=vgg20"])
    with pytest.raises(ConfigError, match=r"prune\.tau \(7\) must be at most prune\.k \(6\)"):
        load_config("synthetic", ["prune.tau=7"])
    with pytest.raises(ConfigError, match=r"data.root is required for data.kind 'cub'"):
        load_config("synthetic", ["data.kind=cub"])


def test_overrides_parse_yaml_values() -> None:
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("model.prototype_size=[2, 1]") == (["model", "prototype_size"], [2, 1])
    assert parse_override("model.weights=null") == (["model", "weights"], None)
    cfg = load_config("synthetic", ["train.epochs=3", "model.prototype_size=[2, 1]"])
    assert cfg.train.epochs == 3 and cfg.model.prototype_size == (2, 1)
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match=r"train\.epochs is a value, not a section"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])


def test_unknown_config_name_lists_the_shipped_ones() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown config 'fashion'; valid: .*fashion_mnist"):
        load_config("fashion")


def test_dumped_config_reloads_to_the_same_config(tmp_path: Path) -> None:
    cfg = load_config("fashion_mnist", ["train.epochs=2"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert validate_config(cfg.to_plain()) == cfg


def test_default_schedule_is_the_papers() -> None:
    cfg = load_config("cub_vgg19")
    t = cfg.train
    pushes = [e for e in range(t.epochs) if is_push_epoch(e, t)]
    assert pushes == [10, 20, 30, 40, t.epochs - 1]
    units = plan_units(t)
    assert [u.kind for u in units[:5]] == ["warm"] * 5
    assert [u.kind for u in units if u.epoch == 10] == ["joint", "push", "last_layer"]
    assert units[-1].kind == "last_layer" and units[-1].epoch == t.epochs - 1
    # Step decay x0.1 every 5 joint epochs.
    assert [joint_lr_factor(j, 5, 0.1) for j in (0, 4, 5, 10)] == pytest.approx([1, 1, 0.1, 0.01])
