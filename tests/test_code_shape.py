"""The house's size rules (docs/architecture.md#import-rules and issue 13): a source file of app/, workers/ or
qaas/ stays under MAX_FILE_LINES, and a function's body (its docstring aside) under MAX_BODY_LINES unless a
comment right above it says why (`# Long: ...`). A newcomer reads a seam in one screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers", "qaas")
MAX_FILE_LINES = 500
MAX_BODY_LINES = 60


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    documented = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(node.body) > 1
    start = node.body[1].lineno if documented else first.lineno
    return (node.end_lineno or node.lineno) - start + 1


def test_no_source_file_is_over_the_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n for p in _sources() if (n := p.read_text().count("\n")) > MAX_FILE_LINES
    }
    assert not long, f"split these files by concept (at most {MAX_FILE_LINES} lines): {long}"


def test_no_function_is_long_without_a_reason() -> None:
    long = []
    for path in _sources():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and _body_lines(node) > MAX_BODY_LINES
            ):
                above = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if not lines[above - 2].strip().startswith("# Long:"):
                    long.append(f"{path.relative_to(ROOT)}::{node.name} ({_body_lines(node)} lines)")
    assert not long, f"split these into named steps, or say why above them with '# Long: ...': {long}"
