"""DESIGN §1: protocol/ imports nothing from router/ or workers/, and nothing of pynetdicom."""

from __future__ import annotations

import ast
from pathlib import Path

import protocol

FORBIDDEN = ("router", "workers", "pynetdicom")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_protocol_imports_nothing_from_the_router_workers_or_pynetdicom() -> None:
    root = Path(protocol.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert sources, "protocol/ sources not found"
    offenders = {
        f"{path.relative_to(root)}: {name}"
        for path in sources
        for name in _imported_modules(path)
        if name.split(".")[0] in FORBIDDEN
    }
    assert not offenders
