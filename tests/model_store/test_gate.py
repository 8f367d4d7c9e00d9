"""The promotion gate on real store versions: a worse candidate is refused with the
comparison printed and the alias unmoved; --force moves it and the history says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store import ModelStore
from model_store.cli import main
from model_store.gate import compare
from model_store.manifest import Interpretability
from tests.model_store.conftest import publish_tiny
from tests.model_store.test_cli import run_cli


def _quality(**over: float) -> Interpretability:
    base = dict(
        prototypes=6, unique_prototypes=6, duplicates=0, background_prototypes=0,
        sparsity=0.9, stability=0.95, consistency=None,
    )  # fmt: skip
    return Interpretability.model_validate(base | over)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "store")
    good = {"test_accuracy": 0.90, "test_balanced_accuracy": 0.89}
    publish_tiny(s, seed=0, metrics=good, interpretability=_quality(), aliases=("production",))
    # 2: within the tolerance; 3: two background prototypes more and less stable.
    publish_tiny(s, seed=1, metrics={"test_accuracy": 0.895}, interpretability=_quality())
    worse = _quality(background_prototypes=2, unique_prototypes=5, duplicates=1, stability=0.8)
    publish_tiny(s, seed=2, metrics={"test_accuracy": 0.91}, interpretability=worse)
    return s


def test_compare_judges_each_figure_against_the_tolerance(store: ModelStore) -> None:
    m1, m3 = (store.load(f"tiny@{v}").manifest for v in ("1", "3"))
    rows = {r.figure: r for r in compare(m1, m3, tolerance=0.01)}
    assert rows["test_accuracy"].passed and rows["test_accuracy"].worse_by == pytest.approx(-0.01)
    assert not rows["background_share"].passed  # 0 -> 2 of 6: lower is better
    assert rows["background_share"].worse_by == pytest.approx(2 / 6)
    assert not rows["unique_share"].passed and not rows["stability"].passed
    assert rows["consistency"].worse_by is None and rows["consistency"].passed  # unmeasured
    assert rows["test_balanced_accuracy"].worse_by is None  # version 3 lacks it
    # A larger tolerance lets the stability drop (0.15) through, not the background share.
    loose = {r.figure: r.passed for r in compare(m1, m3, tolerance=0.2)}
    assert loose["stability"] and not loose["background_share"]
    with pytest.raises(ValueError, match="tolerance"):
        compare(m1, m3, tolerance=-1)


def test_promote_refuses_a_worse_version_and_force_records_it(
    store: ModelStore, capsys: pytest.CaptureFixture
) -> None:
    root = str(store.root)
    assert main(["--root", root, "promote", "tiny", "2", "production"]) == 0  # 0.5 points
    assert store.aliases("tiny")["production"] == "2"
    capsys.readouterr()
    assert main(["--root", root, "promote", "tiny", "3", "production"]) == 1
    out, err = capsys.readouterr()
    assert "background_share" in out and "WORSE by 0.3333" in out and "stability" in out
    assert "refused: tiny@3 is worse than tiny@2 on" in err and "--force" in err
    assert store.aliases("tiny")["production"] == "2"  # unmoved
    assert main(["--root", root, "promote", "tiny", "3", "production", "--force"]) == 0
    assert "forced past: unique_share, background_share, stability" in capsys.readouterr().out
    assert store.aliases("tiny")["production"] == "3"
    history = store.alias_history("tiny")
    last = history[-1]
    assert (last["alias"], last["previous"], last["version"], last["forced"]) == (
        "production", "2", "3", True,
    )  # fmt: skip
    assert last["failed"] == ["unique_share", "background_share", "stability"]
    assert history[-2]["forced"] is False and history[-2]["previous"] == "1"
    assert [(h["alias"], h["version"]) for h in history[:3]] == [
        ("production", "1"), ("latest", "2"), ("latest", "3"),
    ]  # publishing moves aliases too  # fmt: skip
    # A tolerance wide enough lets it through without force.
    assert main(["--root", root, "promote", "tiny", "1", "staging"]) == 0  # a new alias
    assert main(["--root", root, "promote", "tiny", "3", "staging", "--tolerance", "0.5"]) == 0


@pytest.mark.slow
def test_the_gate_as_a_separate_process(store: ModelStore) -> None:
    root = str(store.root)
    r = run_cli("--root", root, "promote", "tiny", "3", "production")
    assert r.returncode == 1 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert "background_share" in r.stdout
    r = run_cli("--root", root, "history", "tiny")
    assert r.returncode == 0 and "production" in r.stdout
    r = run_cli("--root", root, "promote", "tiny", "9", "production")
    assert r.returncode == 1 and "unknown version '9'" in r.stderr
