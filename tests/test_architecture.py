"""The layout's rules, checked from the source (AST) and one subprocess:

- no import cycles among mumic modules (imports at module level and inside functions);
- the layers: a module imports only modules of its own layer or a lower one (LAYERS, LAYER_OF);
- argparse only under src/mumic/cli/; no print() call in src/mumic/ outside cli/;
- no source file in src/ over MAX_LINES lines;
- `python -m mumic --help`, `mumic --version` and every verb's `--help` import
  neither torch nor transformers.

KNOWN lists the violations the tree has today; any other one fails. Remove an entry once it is
fixed (a fixed entry still listed is reported as a warning).

`python tests/test_architecture.py [ROOT]` prints a summary (import graph, violations, file
lengths, startup imports) for this checkout or the one at ROOT; it exits 1 on a new violation.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

# --- the rules, as data -----------------------------------------------------------------------

# Lowest first: a module may import modules of its own layer or of a layer before it.
LAYERS = (
    "base",       # config, errors, io, distributed, losses (the registry), heads (the scoring)
    "data",       # manifests, labels, images, datasets, importers, emoji
    "backbones",  # image/text towers
    "model",      # the model, metrics
    "inference",  # run directories, the predictor, the frozen-feature cache
    "jobs",       # train, evaluate, batch jobs, search, export, audit
    "apps",       # serve, study (ablations), demo
    "cli",        # the command line
)

# Module or package (covering its submodules) -> layer; the longest matching name wins.
# Every module under src/mumic/ must match an entry: a new module is placed here.
LAYER_OF = {
    "mumic": "base",  # mumic/__init__.py alone: __version__ (its lazy names: FACADE below)
    "mumic.config": "base",
    "mumic.errors": "base",
    "mumic.io": "base",
    "mumic.readers": "base",
    "mumic.distributed": "base",
    "mumic.heads": "base",
    "mumic.data": "data",
    "mumic.backbones": "backbones",
    "mumic.model": "model",
    "mumic.losses": "base",  # the registry config validates against; each loss imports torch when called
    "mumic.metrics": "model",
    "mumic.run": "inference",
    "mumic.predictor": "inference",
    "mumic.features": "inference",
    "mumic.train": "jobs",
    "mumic.evaluate": "jobs",
    "mumic.report": "jobs",
    "mumic.batch": "jobs",
    "mumic.search": "jobs",
    "mumic.export": "jobs",
    "mumic.export_hf": "jobs",  # the transformers export of hf: runs
    "mumic.card": "jobs",  # the model card (README.md) of runs and exports
    "mumic.export_script": "jobs",  # the source of an export's predict.py (Pillow, numpy, onnxruntime only)
    "mumic.audit": "jobs",
    "mumic.serve": "apps",
    "mumic.study": "apps",
    "mumic.ablate": "apps",
    "mumic.demo": "apps",
    "mumic.cli": "cli",
    "mumic.__main__": "cli",
}

# Imports exempt from the layer rule (they still count for cycles): the package's lazy public
# names `mumic.MuMIC`, `mumic.Predictor` and `mumic.fit` (PEP 562 __getattr__), imported only when a user asks.
FACADE = {("mumic", "mumic.model"), ("mumic", "mumic.predictor"), ("mumic", "mumic.train")}

MAX_LINES = 500
STARTUP_FORBIDDEN = ("torch", "transformers")
STARTUP_COMMANDS = {  # label -> argv after `mumic`; the first runs as `python -m mumic`
    "python -m mumic --help": ["--help"],
    "mumic --version": ["--version"],
    "mumic train --help": ["train", "--help"],
    "mumic serve --help": ["serve", "--help"],
    "mumic predict --help": ["predict", "--help"],
    **{f"mumic {v} --help": [*v.split(), "--help"] for v in (
        "evaluate", "embed", "data emoji", "data shapes", "data import", "demo", "ablate", "index", "search", "export", "card",
        "audit")},
}

# Violations present today, by check. Each entry is the exact text the check reports; delete
# it when the violation is gone. Nothing may be added here without a reason in the comment.
KNOWN: dict[str, set[str]] = {
    "cycles": set(),
    "layers": set(),
    "argparse": set(),
    "print": set(),
    "long files": set(),
    "startup": set(),
}

ROOT = Path(__file__).resolve().parents[1]

# --- reading the source -----------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the mumic module imported
    path: str  # the importing file, relative to the root
    line: int
    function: str | None  # the enclosing function, None at module level

    def where(self) -> str:
        return f"{self.path}:{self.line}" + (f" in {self.function}()" if self.function else "")


@dataclass(frozen=True)
class Tree:
    root: Path
    modules: dict[str, Path]  # dotted name -> file
    packages: frozenset[str]
    syntax: dict[str, ast.Module]

    def rel(self, name: str) -> str:
        return self.modules[name].relative_to(self.root).as_posix()


@cache
def read_tree(root: Path = ROOT) -> Tree:
    src = root / "src"
    modules, packages, syntax = {}, set(), {}
    for path in sorted((src / "mumic").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        name = ".".join(parts)
        modules[name] = path
        syntax[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return Tree(root, modules, frozenset(packages), syntax)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, function: str | None = None):
    """(node, enclosing function) for every node below `node`, skipping `if TYPE_CHECKING:`
    bodies (they never run, so they make neither cycles nor dependencies)."""
    for child in ast.iter_child_nodes(node):
        for c in child.orelse if isinstance(child, ast.If) and _is_type_checking(child) else [child]:
            yield c, function
            yield from _walk(c, c.name if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef)) else function)


def _resolve(tree: Tree, name: str) -> str | None:
    """The module `import name` loads last: name itself, or its longest existing parent."""
    while name and name not in tree.modules:
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(root: Path = ROOT) -> tuple[Import, ...]:
    tree = read_tree(root)
    found = []
    for name, syntax in tree.syntax.items():
        for node, function in _walk(syntax):
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if name in tree.packages else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                wanted = [f"{module}.{a.name}" if f"{module}.{a.name}" in tree.modules else module for a in node.names]
            else:
                continue
            for w in wanted:
                if w == "mumic" or w.startswith("mumic."):
                    target = _resolve(tree, w)
                    if target and target != name:
                        found.append(Import(name, target, tree.rel(name), node.lineno, function))
    return tuple(found)


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in read_tree(root).modules}
    for imp in imports(root):
        g[imp.source].add(imp.target)
    return g


def layer_of(module: str) -> str | None:
    """The layer of the longest LAYER_OF name that is `module` or a package above it; the
    entry for the package `mumic` itself covers only mumic/__init__.py."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if (layer := LAYER_OF.get(".".join(parts[:n]))) is not None:
            return layer
    return LAYER_OF.get(module)


# --- the checks: each returns {violation text: detail} ----------------------------------------


def unplaced_modules(root: Path = ROOT) -> list[str]:
    return [m for m in read_tree(root).modules if layer_of(m) is None]


def _components(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(g: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(g[v] & within):
            if w == start:
                chain = [v]
                while chain[-1] != start:
                    chain.append(prev[chain[-1]])
                return [*reversed(chain), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle")


def cycles(root: Path = ROOT) -> dict[str, str]:
    """The shortest cycle through each module that is on one, as `a -> b -> a`, starting at
    its alphabetically first module."""
    g = graph(root)
    lines = {(i.source, i.target): i.where() for i in imports(root)}
    found = {}
    for comp in _components(g):
        for start in comp:
            chain = _shortest_cycle(g, start, set(comp))[:-1]
            i = chain.index(min(chain))
            chain = chain[i:] + chain[:i] + [chain[i]]
            found[" -> ".join(chain)] = "; ".join(lines[a, b] for a, b in zip(chain, chain[1:]))
    return found


def layer_violations(root: Path = ROOT) -> dict[str, str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    found: dict[str, str] = {}
    for imp in imports(root):
        a, b = layer_of(imp.source), layer_of(imp.target)
        if a is None or b is None or (imp.source, imp.target) in FACADE:
            continue
        if rank[b] > rank[a]:
            key = f"{imp.source} -> {imp.target}"
            detail = f"{a} imports {b} at {imp.where()}"
            found[key] = f"{found[key]}; {imp.where()}" if key in found else detail
    return found


def _in_cli(module: str) -> bool:
    return module == "mumic.cli" or module.startswith("mumic.cli.")


def _outside_cli(root: Path, hit: Callable[[ast.AST], bool]) -> dict[str, str]:
    """module -> "file:line, ..." of the nodes outside cli/ for which `hit` is true."""
    tree = read_tree(root)
    found: dict[str, list[str]] = {}
    for name, syntax in tree.syntax.items():
        if _in_cli(name):
            continue
        for node, _ in _walk(syntax):
            if hit(node):
                found.setdefault(name, []).append(f"{tree.rel(name)}:{node.lineno}")
    return {k: ", ".join(v) for k, v in found.items()}


def _imports_argparse(node: ast.AST) -> bool:
    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
        [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
    return any(m == "argparse" or m.startswith("argparse.") for m in mods)


def argparse_outside_cli(root: Path = ROOT) -> dict[str, str]:
    return _outside_cli(root, _imports_argparse)


def prints_outside_cli(root: Path = ROOT) -> dict[str, str]:
    return _outside_cli(root, lambda n: isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print")


def file_lengths(root: Path = ROOT) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
        for p in sorted((root / "src").rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def long_files(root: Path = ROOT) -> dict[str, str]:
    return {path: f"{n} lines" for path, n in file_lengths(root).items() if n > MAX_LINES}


# One interpreter under -X importtime forks a child per startup command, so each child starts
# from the same bare interpreter and its -X importtime lines are exactly what that command
# imports; a marker on stderr before each child tells whose lines follow.
_STARTUP_SCRIPT = r"""
import contextlib, io, json, os, runpy, sys
results = {}
for n, (label, argv) in enumerate(json.loads(sys.argv[1]).items()):
    sys.stderr.write("@@mumic-startup " + label + "\n")
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out, code = io.StringIO(), None
        with contextlib.redirect_stdout(out):
            try:
                sys.argv = ["mumic", *argv]
                if n == 0:
                    runpy.run_module("mumic", run_name="__main__", alter_sys=True)
                else:
                    from mumic.cli import main
                    code = main()
            except SystemExit as e:
                code = e.code
            except BaseException as e:
                code = repr(e)
        sys.stderr.flush()
        os.write(w, json.dumps({"code": code, "stdout": out.getvalue()}).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    results[label] = json.loads(data or b'{"code": "the child died", "stdout": ""}')
sys.stderr.write("@@mumic-startup end\n")
sys.stdout.write(json.dumps(results))
"""


@cache
def startup(root: Path = ROOT) -> dict[str, dict]:
    """label -> {"code", "stdout", "imports": [every module the command imported]}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _STARTUP_SCRIPT, json.dumps(STARTUP_COMMANDS)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"the startup commands crashed:\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout)
    label = None
    for line in proc.stderr.splitlines():
        if line.startswith("@@mumic-startup "):
            label = line.split(" ", 1)[1]
        elif line.startswith("import time:") and label in results and "|" in line:
            field = line.rsplit("|", 1)[1]
            name = field.strip()
            if name != "imported package":
                results[label].setdefault("imports", []).append(name)
                results[label].setdefault("depths", []).append(len(field) - len(field.lstrip()))
    return results


def _importers(r: dict, package: str) -> list[str]:
    """The mumic modules on the import chain that first loaded `package`, innermost first
    (-X importtime prints a module after what it imported, indented one step deeper)."""
    names, depths = r.get("imports", []), r.get("depths", [])
    for i, name in enumerate(names):
        if name == package:
            chain, depth = [], depths[i]
            for later, d in zip(names[i + 1:], depths[i + 1:]):
                if d < depth:
                    depth = d
                    if later.startswith("mumic"):
                        chain.append(later)
            return chain
    return []


def startup_violations(root: Path = ROOT) -> dict[str, str]:
    found = {}
    for label, r in startup(root).items():
        loaded = {name.split(".")[0] for name in r.get("imports", [])}
        for pkg in STARTUP_FORBIDDEN:
            if pkg in loaded:
                found[f"{label}: {pkg}"] = f"imported by {' <- '.join(_importers(r, pkg)) or 'a module outside mumic'}"
    return found


CHECKS = {
    "cycles": cycles,
    "layers": layer_violations,
    "argparse": argparse_outside_cli,
    "print": prints_outside_cli,
    "long files": long_files,
    "startup": startup_violations,
}

# --- the tests --------------------------------------------------------------------------------


def _check(name: str) -> None:
    found = CHECKS[name]()
    stale = KNOWN[name] - set(found)
    if stale:
        warnings.warn(f"{name}: fixed, remove from KNOWN in {Path(__file__).name}: {sorted(stale)}", stacklevel=2)
    new = {k: v for k, v in found.items() if k not in KNOWN[name]}
    assert not new, f"new {name} violations:\n" + "\n".join(f"  {k}  ({v})" for k, v in sorted(new.items()))


def test_the_layer_table_is_consistent():
    assert set(LAYER_OF.values()) <= set(LAYERS), set(LAYER_OF.values()) - set(LAYERS)
    assert set(KNOWN) == set(CHECKS)


def test_every_module_has_a_layer():
    missing = unplaced_modules()
    assert not missing, f"place these modules in LAYER_OF in {Path(__file__).name}: {missing}"


def test_no_import_cycles():
    _check("cycles")


def test_modules_import_only_their_layer_or_lower():
    _check("layers")


def test_argparse_only_in_the_cli():
    _check("argparse")


def test_no_print_in_the_library():
    _check("print")


def test_source_files_are_short():
    _check("long files")


def test_cli_startup_imports_neither_torch_nor_transformers():
    results = startup()
    # The commands must have run (a crash before the parser would import nothing).
    for label, r in results.items():
        assert r["code"] in (0, None), f"`{label}` exited with {r['code']!r}"
        assert r["stdout"].strip(), f"`{label}` printed nothing"
        assert any(m.startswith("mumic.cli") for m in r.get("imports", [])), f"`{label}` imported no mumic.cli"
    from mumic import __version__

    assert results["mumic --version"]["stdout"].strip() == __version__
    for label in STARTUP_COMMANDS:
        if "--help" in label:
            assert results[label]["stdout"].startswith("usage: "), results[label]["stdout"][:200]
    _check("startup")


@pytest.mark.parametrize(("source", "expected"), [
    ("import mumic.model", ["mumic.model"]),
    ("from mumic import heads, __version__", ["mumic.heads", "mumic"]),
    ("from mumic.backbones import lite, load_backbone", ["mumic.backbones.lite", "mumic.backbones"]),
    ("from mumic.data.manifest import Manifest", ["mumic.data.manifest"]),
    ("from . import base", ["mumic.backbones.base"]),
    ("from .. import errors", ["mumic.errors"]),
    ("def f():\n    from mumic import train", ["mumic.train"]),
    ("if TYPE_CHECKING:\n    import mumic.model\nelse:\n    import mumic.io", ["mumic.io"]),
    ("import numpy, argparse", []),
])
def test_imports_are_read_as_python_resolves_them(tmp_path, source, expected):
    for rel in ("mumic/__init__.py", "mumic/errors.py", "mumic/io.py", "mumic/heads.py", "mumic/model.py", "mumic/train.py",
                "mumic/data/__init__.py", "mumic/data/manifest.py", "mumic/backbones/__init__.py",
                "mumic/backbones/base.py", "mumic/backbones/lite.py"):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_text("")
    (tmp_path / "src/mumic/backbones/hf.py").write_text(source + "\n")
    assert [i.target for i in imports(tmp_path) if i.source == "mumic.backbones.hf"] == expected


def test_cycles_and_layer_breaks_are_reported_readably(tmp_path):
    files = {
        "mumic/__init__.py": "",
        "mumic/errors.py": "",
        "mumic/data/__init__.py": "",
        "mumic/data/manifest.py": "from mumic.model import MuMIC\n",
        "mumic/model.py": "def f():\n    from mumic.data import manifest\n",
        "mumic/newthing.py": "import argparse\nprint('hi')\n",
    }
    for rel, text in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_text(text)
    assert list(cycles(tmp_path)) == ["mumic.data.manifest -> mumic.model -> mumic.data.manifest"]
    assert list(layer_violations(tmp_path)) == ["mumic.data.manifest -> mumic.model"]
    assert "src/mumic/data/manifest.py:1" in layer_violations(tmp_path)["mumic.data.manifest -> mumic.model"]
    assert unplaced_modules(tmp_path) == ["mumic.newthing"]
    assert list(argparse_outside_cli(tmp_path)) == ["mumic.newthing"]
    assert list(prints_outside_cli(tmp_path)) == ["mumic.newthing"]


# --- the summary ------------------------------------------------------------------------------


def summary(root: Path = ROOT) -> int:
    """Prints the state of every rule; returns the number of violations not in KNOWN."""
    tree = read_tree(root)
    imps = imports(root)
    g = graph(root)
    print(f"mumic at {root}")
    print(f"\nimport graph: {len(tree.modules)} modules, {sum(map(len, g.values()))} edges "
          f"({sum(i.function is None for i in imps)} imports at module level, {sum(i.function is not None for i in imps)} in functions)")
    for layer in LAYERS:
        members = [m for m in tree.modules if layer_of(m) == layer]
        print(f"  {layer:<10} {len(members):>3}  {' '.join(members)}")
    unplaced = unplaced_modules(root)
    if unplaced:
        print(f"  UNPLACED       {' '.join(unplaced)}")
    new_total = len(unplaced)
    for name, check in CHECKS.items():
        found = check(root)
        new = [k for k in found if k not in KNOWN[name]]
        stale = sorted(KNOWN[name] - set(found))
        new_total += len(new)
        print(f"\n{name}: {len(found)} ({len(new)} new, {len(found) - len(new)} known" + (f", {len(stale)} fixed" if stale else "") + ")")
        for k, v in sorted(found.items()):
            print(f"  {'NEW ' if k in new else 'known'} {k}  ({v})")
        for k in stale:
            print(f"  fixed {k}  (remove it from KNOWN)")
        if name == "long files":
            longest = sorted(file_lengths(root).items(), key=lambda kv: -kv[1])[:10]
            print("  longest: " + ", ".join(f"{p.removeprefix('src/mumic/')} {n}" for p, n in longest))
        if name == "startup":
            for label, r in startup(root).items():
                loaded = r.get("imports", [])
                print(f"  {label}: exit {r['code']}, {len(loaded)} modules imported")
    print(f"\n{new_total} new violation(s)")
    return new_total


if __name__ == "__main__":
    sys.exit(1 if summary(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT) else 0)
