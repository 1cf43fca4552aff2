"""Does a pytest selection exercise every product module? (Not a test: run it by hand.)

    python tests/module_coverage.py                 # the fast subset: -m "not slow"
    python tests/module_coverage.py -- -k search    # any other pytest arguments after --

Runs pytest under `coverage` (pip install coverage; it is not a dependency of vmr) on this process only (child
processes and Ray workers are not measured: a module counts only if the test process itself runs it), then lists
every .py under indexer/ retriever/ store/ server/ model/ world/ and cli.py with the lines of its function bodies
that ran. A module fails the check if it was never imported, or if it defines functions and none of their bodies
ran (imported but not exercised). Exit status: pytest's if it failed, else 1 if a module fails the check, else 0.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["indexer", "retriever", "store", "server", "model", "world"]


def product_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    for pkg in PACKAGES:
        files += sorted(p for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def body_lines(path: Path) -> set[int]:
    """Lines inside function bodies (what only runs when the module is used, not when it is imported)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def main(argv: list[str]) -> int:
    import coverage

    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else ["-q", "-m", "not slow", "tests"]
    include = ",".join([str(ROOT / "cli.py")] + [f"{ROOT / p}/*" for p in PACKAGES])
    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / ".coverage")
        run = subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data_file}",
                              f"--include={include}", "-m", "pytest", *pytest_args], cwd=ROOT)
        data = coverage.CoverageData(basename=data_file)
        data.read()
        measured = {Path(f).resolve(): set(data.lines(f) or ()) for f in data.measured_files()}
    failing = []
    for path in product_files():
        rel = path.relative_to(ROOT).as_posix()
        ran = measured.get(path.resolve())
        bodies = body_lines(path)
        if ran is None:
            verdict = "NOT IMPORTED"
        elif bodies and not ran & bodies:
            verdict = "imported only"
        else:
            verdict = "ok"
        shown = f"{len(ran & bodies)}/{len(bodies)} body lines" if ran is not None else "-"
        print(f"{verdict:14s} {rel:36s} {shown}")
        if verdict != "ok":
            failing.append(rel)
    print(f"{len(product_files()) - len(failing)}/{len(product_files())} product modules exercised"
          + (f"; not: {', '.join(failing)}" if failing else ""))
    if run.returncode:
        return run.returncode
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
