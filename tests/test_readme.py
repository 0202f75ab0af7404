"""The README's Python example is the first code a user runs: it must work as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("max_new_tokens=32", "max_new_tokens=4")  # the same calls, fewer tokens
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip(), "the example printed nothing"


def test_top_level_api():
    import ponder

    assert callable(ponder.load) and callable(ponder.from_hf) and callable(ponder.embed)
    try:
        ponder.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("unknown attribute did not raise")
