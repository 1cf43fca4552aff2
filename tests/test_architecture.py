"""The layout's rules, read from the code: who may import whom, no sys.path edits, product files stay small.

The flow is one-way: cli.py -> indexer/, retriever/, server/ -> model/, store/. world/ (the synthetic test world)
and bench/ (the benchmark suite) are leaves beside the product: bench/ is a program nothing imports, and product
code uses world/ only in `vmr demo`. Imports are read with `ast` from every .py of the checkout (and from Python
scripts held in string constants, as tests and benchmarks hand to child processes); nothing is imported or run.
"""
from __future__ import annotations

import ast
import re
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "__pycache__", "build", "dist", ".pytest_cache", "node_modules"}
PRODUCT = {"cli", "indexer", "retriever", "model", "store", "server"}  # top-level names of the shipped product
MAX_PRODUCT_LINES = 400
# torch and the libraries that pull it in: store/ (DuckDB + FAISS) must load without any of them
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchao", "open_clip", "transformers", "safetensors"}
# A sys.path edit in a script template that cannot be parsed (e.g. a str.format template)
SYS_PATH_EDIT = re.compile(r"\bsys\s*\.\s*path\s*(\.\s*(insert|append|extend|remove|pop|clear)\s*\(|\[[^]\n]*\]\s*=|\+?=[^=])"
                           r"|\baddsitedir\s*\(|\bsyspath_prepend\s*\(")


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the checkout, e.g. "retriever/search.py"
    line: int
    target: str  # dotted module name imported, e.g. "store.library"
    function: str | None  # innermost enclosing function (None: at module level)
    names: tuple[str, ...] = ()  # what ``from target import ...`` names (a submodule among them is imported too)

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        where = f" (in {self.function}())" if self.function else ""
        return f"{self.file}:{self.line} imports {self.target}{where}"


def _candidate_files() -> list[Path]:
    """The checkout's own .py files: tracked or untracked-but-not-ignored (a throwaway copy of someone else's
    code that .gitignore or .git/info/exclude hides is not ours); every .py below ROOT outside git."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return sorted(ROOT.rglob("*.py"))
    return sorted(ROOT / rel for rel in listed if rel and (ROOT / rel).is_file())


def python_files() -> list[Path]:
    out = []
    for path in _candidate_files():
        rel = path.relative_to(ROOT)
        if not SKIP_DIRS & set(rel.parts[:-1]) and not rel.parts[0].endswith(".egg-info"):
            out.append(path)
    return out


def top_name(rel: str) -> str:
    """Top-level package of a file: "cli" for cli.py, "model" for model/x.py, "tests" for tests/y.py."""
    return Path(rel).parts[0].removesuffix(".py")


def _module_parts(rel: str) -> list[str]:
    parts = list(Path(rel).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


class _Reader(ast.NodeVisitor):
    """Collects imports (static, and import_module / __import__ of a constant) and sys.path edits of one tree."""

    def __init__(self, rel: str, line_offset: int = 0):
        self.rel, self.offset = rel, line_offset
        self.package = _module_parts(rel) if rel.endswith("__init__.py") else _module_parts(rel)[:-1]
        self.functions: list[str] = []
        self.imports: list[Import] = []
        self.path_edits: list[str] = []

    def _add(self, node: ast.AST, target: str, names: tuple[str, ...] = ()) -> None:
        fn = self.functions[-1] if self.functions else None
        self.imports.append(Import(self.rel, self.offset + node.lineno, target, fn, names))

    def _where(self, node: ast.AST) -> str:
        return f"{self.rel}:{self.offset + node.lineno}"

    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package[: len(self.package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] if node.module else [".".join(base + [a.name]) for a in node.names]
        else:
            names = [node.module]
        imported = tuple(a.name for a in node.names) if node.module else ()
        for name in names:
            self._add(node, name, imported)

    def visit_Call(self, node):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self._add(node, node.args[0].value)
        if name in ("addsitedir", "syspath_prepend"):
            self.path_edits.append(f"{self._where(node)} calls {name}()")
        if isinstance(func, ast.Attribute) and _is_sys_path(func.value):
            self.path_edits.append(f"{self._where(node)} calls sys.path.{func.attr}()")
        self.generic_visit(node)

    def _assigned(self, node, targets):
        for t in targets:
            if _is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)):
                self.path_edits.append(f"{self._where(node)} assigns to sys.path")

    def visit_Assign(self, node):
        self._assigned(node, node.targets)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._assigned(node, [node.target])
        self.generic_visit(node)

    def visit_Constant(self, node):
        """A string that is a Python script (for a child process) is read like a file."""
        text = node.value
        if not isinstance(text, str) or "\n" not in text or "import" not in text:
            return
        try:
            tree = ast.parse(textwrap.dedent(text))
        except SyntaxError:  # a template or prose: fall back to the text itself for sys.path edits
            if SYS_PATH_EDIT.search(text):
                self.path_edits.append(f"{self._where(node)} holds a script that edits sys.path")
            return
        inner = _Reader(self.rel, self.offset + node.lineno - 1)
        inner.visit(tree)
        self.imports += inner.imports
        self.path_edits += inner.path_edits


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def read(path: Path) -> _Reader:
    rel = path.relative_to(ROOT).as_posix()
    reader = _Reader(rel)
    reader.visit(ast.parse(path.read_text(), filename=rel))
    return reader


@pytest.fixture(scope="module")
def readers() -> dict[str, _Reader]:
    return {r.rel: r for r in map(read, python_files())}


@pytest.fixture(scope="module")
def imports(readers) -> list[Import]:
    return [imp for r in readers.values() for imp in r.imports]


def _fail_if(violations, rule: str) -> None:
    assert not violations, f"{rule}:\n  " + "\n  ".join(map(str, violations))


def test_the_checkout_is_read(readers, imports):
    """The rules below see the real tree (guards against a walk that silently finds nothing)."""
    tops = {top_name(rel) for rel in readers}
    assert {"cli", "indexer", "retriever", "model", "store", "world", "bench", "tests"} <= tops
    assert any(i.file == "cli.py" and i.target == "world.demo" and i.function == "demo" for i in imports)
    assert not any(rel.startswith(".venv") for rel in readers)


def test_nothing_outside_bench_imports_bench(imports):
    _fail_if([i for i in imports if i.top == "bench" and top_name(i.file) != "bench"],
             "bench/ is a leaf (run it as `python -m bench`); these import it")


def test_only_tests_import_tests(imports):
    _fail_if([i for i in imports if i.top == "tests" and top_name(i.file) != "tests"],
             "tests/ helpers are for tests only; these import them")


def test_store_loads_without_torch(imports):
    """Nothing store/ imports, directly or through other modules of this checkout, is torch or pulls it in."""
    by_file: dict[str, list[Import]] = {}
    for i in imports:
        by_file.setdefault(i.file, []).append(i)
    module_file = {".".join(_module_parts(f)): f for f in by_file}
    seen, todo, bad = set(), [f for f in by_file if top_name(f) == "store"], []
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for i in by_file.get(f, []):
            if i.top in TORCH_FAMILY:
                bad.append(i)
            parts = i.target.split(".")
            inner = [module_file[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in module_file]
            todo += inner[:1]
    _fail_if(bad, "store/ must not import torch (or what pulls it in), directly or through other modules")


def import_graph(imports: list[Import]) -> dict[str, set[str]]:
    """Module -> the checkout's modules it imports, at module level or inside a function alike: ``a.b.c`` resolves to
    the longest prefix that is a module of the checkout, and ``from a.b import c`` to ``a.b.c`` too when that is a
    module. Imports held in script strings (for child processes) are left out: another process runs them."""
    files = {i.file for i in imports}
    modules = {".".join(_module_parts(f)) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        importer = ".".join(_module_parts(i.file))
        parts = i.target.split(".")
        found = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None)
        targets = {found} if found else set()
        targets |= {f"{i.target}.{name}" for name in i.names if f"{i.target}.{name}" in modules}
        graph[importer] |= targets - {importer}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


@pytest.fixture(scope="module")
def code_imports(readers) -> list[Import]:
    """The imports of the code itself, without those of scripts held in strings."""
    out = []
    for r in readers.values():
        reader = _Reader(r.rel)
        reader.visit_Constant = lambda node: None  # noqa: E731 - scripts in strings run in another process
        reader.visit(ast.parse((ROOT / r.rel).read_text(), filename=r.rel))
        out += reader.imports
    return out


def test_no_import_cycles(code_imports):
    """No module reaches itself through imports, function-level ones included (a cycle hidden behind a function-level
    import still ties its modules together: none can be understood, moved or tested alone)."""
    cycles = [c for c in strongly_connected(import_graph(code_imports)) if len(c) > 1]
    _fail_if([" <-> ".join(c) for c in cycles], "import cycles (strongly connected modules)")


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(c for c in strongly_connected(graph) if len(c) > 1) == [["a", "b", "c"]]
    imports = [Import("p/x.py", 1, "p", None, ("y",)), Import("p/y.py", 2, "p.x.z", "f"), Import("p/__init__.py", 1, "os", None)]
    assert import_graph(imports) == {"p.x": {"p", "p.y"}, "p.y": {"p.x"}, "p": set()}


# model/'s rooms, lowest first: each imports only the shared top level of model/ and the rooms before it
MODEL_ROOMS = ["net", "data", "inference", "training"]


@pytest.mark.parametrize("room", MODEL_ROOMS)
def test_model_rooms_import_downwards_only(imports, room):
    forbidden = {f"model.{r}" for r in MODEL_ROOMS[MODEL_ROOMS.index(room) + 1:]}
    bad = [i for i in imports if i.file.startswith(f"model/{room}/")
           and any(i.target == f or i.target.startswith(f + ".") for f in forbidden)]
    _fail_if(bad, f"model/{room}/ may not import {', '.join(sorted(forbidden)) or 'anything above it'}")


def test_shared_model_modules_import_no_room(imports):
    rooms = {f"model.{r}" for r in MODEL_ROOMS}
    bad = [i for i in imports if top_name(i.file) == "model" and len(Path(i.file).parts) == 2
           and ".".join(i.target.split(".")[:2]) in rooms]
    _fail_if(bad, "model/'s shared top-level modules are below its rooms: they import none of them")


@pytest.mark.parametrize("importer, forbidden", [
    ("model", {"store", "retriever", "indexer", "server", "cli"}),
    ("store", {"model", "retriever", "indexer", "server", "cli"}),
    ("indexer", {"retriever", "server", "cli"}),
    ("retriever", {"indexer", "server", "cli"}),
    ("server", {"indexer", "cli"}),
])
def test_layers_import_downwards_only(imports, importer, forbidden):
    _fail_if([i for i in imports if top_name(i.file) == importer and i.top in forbidden],
             f"{importer}/ may not import {', '.join(sorted(forbidden))}")


def test_product_uses_world_only_in_vmr_demo(imports):
    bad = [i for i in imports if top_name(i.file) in PRODUCT and i.top == "world"
           and not (i.file == "cli.py" and i.function == "demo")]
    _fail_if(bad, "the synthetic test world is for tests, bench and `vmr demo` (lazily, in cli.py's demo) only")


def test_no_code_edits_sys_path(readers):
    edits = [e for r in readers.values() for e in r.path_edits]
    _fail_if(edits, "no code edits the import path (use PYTHONPATH for a child process, or importlib)")


def test_no_sql_outside_store(readers):
    """Only store/ talks to DuckDB: the rest of the product reads and writes the index through store's functions
    (so a sharded or remote store can stand behind them). Seen as a call of ``.execute``/``.sql`` or a SQL verb
    opening a string."""
    sql_start = re.compile(r"^\s*(SELECT\s.*\bFROM\b|INSERT\s+(OR\s+\w+\s+)?INTO\b|UPDATE\s+\w+\s+SET\b|"
                           r"DELETE\s+FROM\b|(CREATE|DROP|ALTER)\s+(TABLE|INDEX|SEQUENCE)\b)", re.DOTALL)
    found = []
    for rel in readers:
        if top_name(rel) not in PRODUCT or top_name(rel) == "store":
            continue
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("execute", "executemany", "sql"):
                found.append(f"{rel}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and sql_start.match(node.value):
                found.append(f"{rel}:{node.lineno}: {node.value.strip()[:40]!r}")
    _fail_if(found, "SQL outside store/ (add a function to store/ and call it)")


def test_product_files_stay_small(readers):
    sizes = {rel: len((ROOT / rel).read_text().splitlines()) for rel in readers if top_name(rel) in PRODUCT}
    _fail_if([f"{rel}: {n} lines" for rel, n in sorted(sizes.items()) if n > MAX_PRODUCT_LINES],
             f"product files over {MAX_PRODUCT_LINES} lines (split by concern)")


def test_rules_catch_what_they_forbid():
    """The reader itself: each forbidden pattern is seen, in code and in a script held in a string. (The sample is
    written in capitals and lowered here, so that this file itself breaks no rule.)"""
    sample = (
        "IMPORT SYS, SITE\n"
        "FROM STORE.LIBRARY IMPORT LIBRARY\n"
        "FROM . IMPORT SIBLING\n"
        "DEF F():\n"
        "    IMPORT WORLD.DEMO\n"
        "    SYS.PATH.INSERT(0, 'A')\n"
        "    SYS.PATH[:0] = ['B']\n"
        "    SITE.ADDSITEDIR('C')\n"
        "SCRIPT = '''\nIMPORT SYS\nSYS.PATH.APPEND('D')\nIMPORT BENCH.SUITE\n'''\n"
        "TEMPLATE = '''\nIMPORT SYS\nSYS.PATH.INSERT(0, {ROOT!R})\nX = {{1}}\n'''\n").lower()
    reader = _Reader("model/x.py")
    reader.visit(ast.parse(sample))
    got = {(i.target, i.function) for i in reader.imports}
    assert {("store.library", None), ("model.sibling", None), ("world.demo", "f"), ("bench.suite", None)} <= got
    assert len(reader.path_edits) == 5, reader.path_edits
