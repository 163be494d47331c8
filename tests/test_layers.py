"""The house rules that keep crma readable, checked so they cannot rot: every import points down the layers
(import-linter, the contract in pyproject.toml), no import cycle among modules, imports at the top of their
module (inside a function only for an optional or heavy package, marked so), ruff clean, and nothing that
reads or names the specification folder beside the checkout, which a clone of the repository does not have."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def module_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module in `graph` (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return out


def test_every_import_points_down_the_layers():
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_no_import_cycle():
    graph = grimp.build_graph("crma", cache_dir=None)
    assert module_cycles(graph) == []
    # the check finds a cycle when there is one
    graph.add_import(importer="crma.config", imported="crma.cli")
    assert any("crma.config" in c and "crma.cli" in c for c in module_cycles(graph))


def test_imports_sit_at_the_top_of_their_module():
    """An import inside a function hides a dependency (and, in this code base, used to dodge a cycle); only an
    optional package, or a heavy one that a single command needs, is imported where it is used, with a comment
    saying so."""
    found = []
    for path in sorted((ROOT / "crma").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                if not any(word in lines[node.lineno - 1] for word in ("# optional", "# heavy")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert found == []


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the repository's files")
def test_nothing_reads_or_names_the_shared_folder():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    needle = "../" + "shared"
    hits = [f for f in files if (ROOT / f).is_file() and not f.startswith("benchmarks/corpora/")
            and needle in (ROOT / f).read_text(encoding="utf-8", errors="ignore")]
    assert hits == []


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment (pip install -e .[test])")
    run = subprocess.run([str(ruff), "check", "--no-cache", "crma", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
