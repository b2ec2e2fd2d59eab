"""Where DeepSpeed and raw collectives may appear: ZeRO stays inside the engine, collectives go
through DistEnv. The benchmarks are exempt: their baselines are, by definition, plain DeepSpeed and
torch loops, and the memory benchmark reads DeepSpeed's own accounting."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DEEPSPEED = re.compile(r"^\s*(import deepspeed|from deepspeed)|\.ds_[a-z]|[\"']ds_[a-z]", re.MULTILINE)
COLLECTIVES = re.compile(r"^\s*(import torch\.distributed|from torch\.distributed)", re.MULTILINE)


def sources(*exempt: str) -> list[str]:
    files = sorted(str(p.relative_to(REPO)) for package in ("pretrain", "finetune") for p in (REPO / package).rglob("*.py"))
    return [f for f in files if not f.startswith(("pretrain/bench/", *exempt))]


@pytest.mark.parametrize("rule, pattern, exempt", [
    ("DeepSpeed and its ds_ attributes only in pretrain/engine/", DEEPSPEED, ("pretrain/engine/",)),
    ("torch.distributed only in pretrain/dist.py and pretrain/engine/", COLLECTIVES,
     ("pretrain/dist.py", "pretrain/engine/")),
], ids=["deepspeed", "collectives"])
def test_layers_stay_where_they_belong(rule, pattern, exempt):
    files = sources(*exempt)
    assert "pretrain/trainer.py" in files and "finetune/knn.py" in files  # the scan reads the packages
    offenders = {f: m.group(0).strip() for f in files if (m := pattern.search((REPO / f).read_text()))}
    assert not offenders, f"{rule}: {offenders}"


# ---------------------------------------------------------------------------------------------
# Import cycles

CYCLE_PACKAGES = ("pretrain", "finetune", "launch")


def module_names(root: Path = REPO, packages: tuple[str, ...] = CYCLE_PACKAGES) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def module_tables(tree: ast.Module, modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module-level names bound to literals that name project modules (``OBJECTIVES = {...}``)."""
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.value is not None:
            named = {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and c.value in modules}
            for target in node.targets:
                if isinstance(target, ast.Name) and named:
                    tables[target.id] = named
    return tables


def type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:``. Python never runs those imports (a type checker
    reads them: annotations naming a class of a module above), so they cannot make a cycle."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                                         or getattr(node.test, "attr", None) == "TYPE_CHECKING"):
            skipped |= {id(n) for statement in node.body for n in ast.walk(statement)}
    return skipped


def imports_of(name: str, path: Path, modules: dict[str, Path], tables: dict[str, dict[str, set[str]]]) -> set[str]:
    """The project modules ``name`` imports anywhere in it (functions included), and those it imports at
    run time with ``importlib.import_module`` from a table of module names (its own or an imported one);
    not those imported for a type checker only."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, imported_tables = set(), dict(tables.get(name, {}))
    skipped = type_checking_only(tree)
    nodes = [node for node in ast.walk(tree) if id(node) not in skipped]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)  # a submodule, or a name in the module
                if alias.name in tables.get(base, {}):
                    imported_tables[alias.asname or alias.name] = tables[base][alias.name]
    for node in nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module":
            for part in ast.walk(node.args[0]) if node.args else ():
                if isinstance(part, ast.Constant) and part.value in modules:
                    found.add(part.value)
                elif isinstance(part, ast.Name):
                    found |= imported_tables.get(part.id, set())
    return {m for m in found if m in modules and m != name}


def import_cycles(root: Path = REPO, packages: tuple[str, ...] = CYCLE_PACKAGES) -> list[list[str]]:
    """Each group of modules that import one another (Tarjan's strongly connected components)."""
    modules = module_names(root, packages)
    tables = {name: module_tables(ast.parse(path.read_text()), modules) for name, path in modules.items()}
    graph = {name: imports_of(name, path, modules, tables) for name, path in modules.items()}
    index, low, stack, cycles = {}, {}, [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    """A module never imports, even inside a function or through importlib and a table of module
    names, a module that imports it back: layers stay layers, and what imports what can be read."""
    assert not import_cycles(), "modules that import one another: " + "; ".join(" <-> ".join(c) for c in import_cycles())


def test_the_cycle_finder_finds_cycles(tmp_path):
    """What test_no_import_cycles relies on: an import inside a function, and importlib through a table
    of module names in another module, each close a cycle; an import for a type checker only does not."""
    files = {
        "__init__.py": "",
        "a.py": "from pkg.b import f\n",
        "b.py": "def f():\n    import pkg.a\n",
        "table.py": 'MODULES = {"one": "pkg.c"}\n',
        "c.py": "from pkg import d\n",
        "d.py": "import importlib\nfrom pkg.table import MODULES\n\n\ndef load():\n"
                "    return importlib.import_module(MODULES['one'])\n",
        "e.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.f import F\n",
        "f.py": "import pkg.e\n\n\nclass F:\n    pass\n",
    }
    (tmp_path / "pkg").mkdir()
    for name, text in files.items():
        (tmp_path / "pkg" / name).write_text(text)
    assert import_cycles(tmp_path, ("pkg",)) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]
