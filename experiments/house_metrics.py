"""How readable the house is (issue #23): function lengths and McCabe complexity over the package,
CPU plumbing outside ``_runtime``, and import cycles between the package's modules.

Usage: python experiments/house_metrics.py [--package astroprep_torch] [--out experiments/results/house_metrics.md]

Lengths are counted with the AST (every function, nested ones included, decorators excluded);
complexity is McCabe's as ruff's C901 counts it (``ruff check --select C901``). Import cycles are
found on the module-level imports only (imports inside functions are lazy and do not cycle at import).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUMBING = re.compile(r"^\s*(import (threading|ctypes|multiprocessing|concurrent)\b|from (threading|ctypes|multiprocessing|"
                      r"concurrent)[ .]|.*torch\.set_num_(interop_)?threads\()")
#: modules that are plumbing or process orchestration by design, not stages
NOT_STAGES = ("_runtime", "_orphans", "pipeline", "data", "web", "_runners", "cli")


def function_lengths(package: Path):
    rows = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, path.relative_to(ROOT).as_posix(), node.name))
    return sorted(rows, reverse=True)


def complexities(package: Path, limit: int = 10):
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "json",
                          "--config", f"lint.mccabe.max-complexity={limit}", str(package)],
                         capture_output=True, text=True, cwd=ROOT)
    rows = []
    for item in json.loads(out.stdout or "[]"):
        m = re.search(r"`(.+)` is too complex \((\d+) >", item["message"])
        rows.append((int(m.group(2)), Path(item["filename"]).relative_to(ROOT).as_posix(), m.group(1)))
    return sorted(rows, reverse=True)


def plumbing_in_stages(package: Path):
    hits = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.split("/")[0].removesuffix(".py") in NOT_STAGES:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if PLUMBING.match(line) and not line.lstrip().startswith("#"):
                hits.append(f"{path.relative_to(ROOT).as_posix()}:{i}: {line.strip()}")
    return hits


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, is_pkg: bool, lazy: bool):
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if lazy else tree.body):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            for alias in node.names:
                yield f"{mod}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def import_cycles(package: Path, lazy: bool = False):
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {m: {d for d in _imports(p, m, p.name == "__init__.py", lazy) if d in files and d != m}
             for m, p in files.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1 and not node.startswith(dep + ".") and not dep.startswith(node + "."):
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default="astroprep_torch")
    ap.add_argument("--out", default="experiments/results/house_metrics.md")
    args = ap.parse_args(argv)
    package = ROOT / args.package
    lengths, cx = function_lengths(package), complexities(package)
    n = len(lengths)
    lines = ["# House metrics (issue #23)", "", f"`python experiments/house_metrics.py` on `{args.package}`", "",
             f"- functions: {n}; over 60 lines: {sum(r[0] > 60 for r in lengths)}; over 100 lines: "
             f"{sum(r[0] > 100 for r in lengths)}",
             f"- McCabe complexity over 10: {len(cx)}; over 20: {sum(r[0] > 20 for r in cx)} "
             f"({100 * sum(r[0] > 20 for r in cx) / max(n, 1):.2f}% of functions); over 25: {sum(r[0] > 25 for r in cx)}",
             "", "## Functions over 60 lines", "", "| lines | file | function |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in lengths if a > 60]
    lines += ["", "## Complexity over 15", "", "| complexity | file | function |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in cx if a > 15]
    lines += ["", "## CPU plumbing (threading, ctypes, multiprocessing, thread counts) outside `_runtime` and the "
              "orchestration modules", ""] + ([f"- `{h}`" for h in plumbing_in_stages(package)] or ["none"])
    for lazy, what in ((False, "module-level imports"), (True, "imports inside functions included")):
        lines += ["", f"## Import cycles ({what})", ""]
        lines += [f"- {' -> '.join(c)}" for c in import_cycles(package, lazy) if "astroprep_torch" not in c[:1]] or ["none"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
