"""``python -m model_store`` as a user runs it: real processes, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_store import ModelStore
from model_store.cli import main

from .conftest import IMG, publish_tiny, tiny_model

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_store", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def two_versions(store: ModelStore) -> ModelStore:
    publish_tiny(store, seed=0)
    publish_tiny(store, seed=1, metrics={"val_accuracy": 0.75})
    return store


@pytest.mark.slow
def test_command_line_as_a_separate_process(two_versions: ModelStore) -> None:
    """Real processes: output on stdout, one-line errors on stderr, exit codes."""
    root = str(two_versions.root)
    r = run_cli("--root", root, "promote", "tiny", "1", "production")
    assert (r.returncode, r.stdout.strip()) == (0, "tiny@production -> 1"), r.stderr
    r = run_cli("--root", root, "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["tiny", "  1  (production)", "  2  (latest)"]
    r = run_cli("--root", root, "show", "tiny@9")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: unknown version '9'; valid: 1, 2, latest, production"
    assert r.stdout == ""  # no traceback, no partial output


def test_show_summarises_a_version(two_versions: ModelStore, capsys: pytest.CaptureFixture) -> None:
    root = str(two_versions.root)
    assert main(["--root", root, "show", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ref"] == "tiny@2" and info["aliases"] == ["latest"]
    assert info["metrics"]["val_accuracy"] == 0.75
    assert info["num_prototypes"] == 6 and info["prototypes_with_images"] == 6
    assert main(["--root", root, "show", "tiny@1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("tiny@1  aliases: -\n")
    assert (
        "architecture tiny_cnn, bottleneck add-on, D=8, prototype 1x1, log activation, 16 px"
        in text
    )
    assert "classes      3: class_0, class_1, class_2" in text


def test_list_empty_and_as_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "store"
    assert main(["--root", str(root), "list"]) == 0
    assert capsys.readouterr().out.strip() == f"no models in {root}"
    publish_tiny(ModelStore(root), aliases=("latest", "production"))
    assert main(["--root", str(root), "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "tiny", "versions": ["1"], "aliases": {"latest": "1", "production": "1"}}
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "tiny@9"], "error: unknown version '9'; valid: 1, 2, latest"),
        (["show", "ghost@latest"], "error: unknown model 'ghost'; valid: tiny"),
        (["verify", "nope"], "error: unknown model 'nope'; valid: tiny"),
        (["remove", "tiny", "3"], "error: unknown version '3'; valid: 1, 2"),
        (["remove", "ghost", "1"], "error: unknown model 'ghost'; valid: tiny"),
        (
            ["promote", "tiny", "staging", "prod"],
            "error: unknown alias 'staging'; valid: 1, 2, latest",
        ),
        (["promote", "tiny", "2", "7"], "all-digit names are reserved for versions"),
        (["promote", "tiny", "2", "a/b"], "error: invalid alias name 'a/b'"),
    ],
)
def test_errors_name_the_bad_value_and_the_valid_ones(
    two_versions: ModelStore, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    assert main(["--root", str(two_versions.root), *argv]) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""


def test_malformed_command_lines_exit_2(capsys: pytest.CaptureFixture) -> None:
    for argv in (
        ["frobnicate"],
        ["import-reference", "w.pth", "--name", "x", "--backbone", "vgg99"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "invalid choice: 'vgg99'" in capsys.readouterr().err


def test_remove_reports_moved_aliases(
    two_versions: ModelStore, capsys: pytest.CaptureFixture
) -> None:
    root = str(two_versions.root)
    assert main(["--root", root, "promote", "tiny", "2", "production"]) == 0
    assert main(["--root", root, "remove", "tiny", "2"]) == 1
    assert "tiny@2 is aliased as production" in capsys.readouterr().err
    assert main(["--root", root, "remove", "tiny", "2", "--force"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["removed tiny@2", "  alias latest: now 1", "  alias production: removed"]


def test_verify_reports_the_tampered_file(
    two_versions: ModelStore, capsys: pytest.CaptureFixture
) -> None:
    root = str(two_versions.root)
    assert main(["--root", root, "verify"]) == 0
    assert capsys.readouterr().out.splitlines() == ["ok tiny@1 (23 files)", "ok tiny@2 (23 files)"]
    png = two_versions.root / "tiny" / "2" / "prototypes" / "2_patch.png"
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF
    png.write_bytes(bytes(data))
    assert main(["--root", root, "verify"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "ok tiny@1 (23 files)"
    assert f"FAILED tiny@2: {png}: changed or truncated after publishing" in captured.err


@pytest.mark.slow
def test_import_reference_from_the_command_line(
    tmp_path: Path, batch: torch.Tensor, capsys: pytest.CaptureFixture
) -> None:
    source = tiny_model(seed=8)
    whole, state = tmp_path / "whole.pth", tmp_path / "state.pth"
    torch.save(source, whole)
    torch.save(source.state_dict(), state)
    root = str(tmp_path / "store")
    common = ["--backbone", "tiny_cnn", "--img-size", str(IMG), "--class-names", "a,b,c"]
    r = run_cli("--root", root, "import-reference", str(state), "--name", "ref", *common)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"imported {state} as ref@1 (6 prototypes)",
        "  6 of 6 prototypes have no pictures (no --images folder given): [0, 1, 2, 3, 4, 5]",
        "  no familiarity score (answers say familiar: null): no image folder given (--images)",
    ]
    argv = ["--root", root, "import-reference", str(whole), "--name", "ref", *common, "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "pickled Python object" in err and "--trust-pickle" in err
    assert ModelStore(root).versions("ref") == ["1"]
    assert main([*argv, "--trust-pickle", "--alias", "production"]) == 0
    store = ModelStore(root)
    assert store.aliases("ref") == {"latest": "1", "production": "2"}
    for ref in ("ref@1", "ref@production"):
        with torch.no_grad():
            assert torch.equal(store.load(ref).model(batch)[0], source(batch)[0])
