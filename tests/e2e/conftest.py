"""End-to-end fixtures: real `dicom-router` processes (see router_node.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from router_node import RouterNode


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., RouterNode]]:
    nodes: list[RouterNode] = []

    def make(env: dict[str, str] | None = None, root: Path | None = None) -> RouterNode:
        base = root or tmp_path / f"node{len(nodes)}"
        base.mkdir(parents=True, exist_ok=True)
        node = RouterNode(base, env)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.kill()
