"""The README's eager-mode walk-through runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_eager_mode_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Eager mode"): text.index("## Pipeline mode")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python block in the README's eager-mode section"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), ns)
    assert (tmp_path / "triplet.png").stat().st_size > 10_000
    assert len(ns["cat"]) > 50
