"""Tensor parallel (Megatron-style) for dense namespaces, declared by logical axis names.

A model names the axes of its dense parameters (`dense_partitioning()`: path pattern ->
logical names, e.g. a column-parallel kernel ("embed", "mlp") and the row-parallel one
after it ("mlp", "embed")); one short rules table maps logical names to mesh axes (T5X's
habit). XLA then splits the matmuls over `model` and inserts the one all-reduce a
column->row pair needs. Models stay free of mesh code.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axis (None: not split)
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("embed", None),
    ("mlp", "model"),      # hidden units of an MLP: column split, then row split
    ("heads", "model"),    # attention heads
    ("kv", None),
    ("vocab", "model"),
    ("layers", "stage"),
)


def spec_for(names: Sequence[str | None], rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES) -> P:
    table = dict(rules)
    unknown = [n for n in names if n is not None and n not in table]
    if unknown:
        raise ValueError(f"logical axes {unknown} have no rule; rules: {sorted(table)}")
    return P(*(table[n] if n is not None else None for n in names))


def dense_shardings(tree: Any, partitioning: Sequence[tuple[str, Sequence[str | None]]], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES) -> Any:
    """A NamedSharding per leaf of a dense namespace tree: the first pattern (regex over the
    leaf's path, e.g. 'mlp/layers/0/kernel') that matches gives its logical axes; others
    are replicated. A mesh axis of size 1 makes the split a no-op."""
    compiled = [(re.compile(p), tuple(n)) for p, n in partitioning]

    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for pattern, names in compiled:
            if pattern.fullmatch(name):
                if len(names) != leaf.ndim:
                    raise ValueError(f"{name}: {len(names)} logical axes for a rank-{leaf.ndim} array")
                return NamedSharding(mesh, spec_for(names, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)
