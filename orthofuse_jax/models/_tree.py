"""Nested-mapping helpers for Flax parameter trees addressed by key paths (:attr:`.AttentionLayer.path`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["copy_containers", "get_path", "set_path"]


def copy_containers(tree):
    """A copy of ``tree`` with every mapping (dict, FrozenDict) a new ``dict``; the leaves are shared."""
    if isinstance(tree, Mapping):
        return {k: copy_containers(v) for k, v in tree.items()}
    return tree


def get_path(tree, path: Sequence[str]) -> Any:
    """The leaf at ``path`` (a sequence of keys), or ``None`` where the path does not exist."""
    node = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def set_path(tree, path: Sequence[str], value) -> None:
    """Set the leaf at ``path`` of ``tree`` (whose containers along the path are mutable) in place."""
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
