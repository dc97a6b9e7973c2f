"""The README's eager-mode walk-through runs as written."""

import re
from pathlib import Path


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
    # what the text promises: kernel sum ~1 without variance maps, unit noise-normalised scatter
    sub = ns["sub"]
    assert abs(float(sub.kernel_sum[0]) - 1) < 0.02, sub.kernel_sum
    z = (sub.difference / sub.variance.sqrt())[0, 0, 20:-20, 20:-20].flatten()
    z = z[z.isfinite()]
    rstd = 1.4826 * float((z - z.median()).abs().median())
    assert abs(rstd - 1) < 0.1, rstd
