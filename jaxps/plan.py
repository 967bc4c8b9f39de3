"""`jaxps plan`: what each namespace costs and where it lives, before anything is allocated.

Per namespace: shape, bytes including optimizer state, placement, bytes per device and
the realm its placement puts it in. Shapes come from `jax.eval_shape`, so planning a
10^10-row table allocates nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxps.model import Model
import dataclasses
import os

from jaxps.mesh import axis_size
from jaxps.parallel.tensor import dense_shardings
from jaxps.placement import Auto, HostTable, Replicated, RowSharded, row_shards
from jaxps.tables.table import Table


@dataclass
class NamespacePlan:
    name: str
    kind: str                # "table" or "dense"
    shape: tuple[int, ...]
    placement: str
    realm: int
    param_bytes: int
    state_bytes: int         # optimizer slots / optax state
    bytes_per_device: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.state_bytes

    def to_dict(self) -> dict:
        return asdict(self) | {"total_bytes": self.total_bytes}


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def device_budget_bytes(mesh: Mesh) -> int:
    """Memory of one device: what the backend reports (GPU/TPU), else this host's RAM
    split over its devices of the mesh (CPU)."""
    mem = device_memory_bytes(mesh)
    if mem:
        return mem
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = sum(1 for d in mesh.devices.flat if d.process_index == mesh.devices.flat[0].process_index)
    return ram // max(local, 1)


def table_bytes_per_device(t: Table, shards: int) -> int:
    """Rows and optimizer slots of one shard of a row-split table."""
    return t.padded_rows(shards) // shards * t.dim * 4 * (1 + len(t.optimizer.slots))


def resolve(t: Table, mesh: Mesh, budget_bytes: int | None = None) -> Table:
    """The table with an `Auto` placement replaced by what fits: row-sharded on the mesh
    when its shard fits the budget, else in the host parameter server."""
    if not isinstance(t.placement, Auto):
        return t
    auto = t.placement
    budget = device_budget_bytes(mesh) if budget_bytes is None else budget_bytes
    on_mesh = RowSharded(auto.axis)
    fits = table_bytes_per_device(t, row_shards(on_mesh, mesh)) <= auto.budget_fraction * budget
    return dataclasses.replace(t, placement=on_mesh if fits else HostTable(auto.host_kind))


def plan_model(model: Model, mesh: Mesh, dense_tx: optax.GradientTransformation) -> list[NamespacePlan]:
    plans = []
    for declared in model.tables():
        t = resolve(declared, mesh)
        shards = row_shards(t.placement, mesh)
        rows = t.padded_rows(shards)
        pb = rows * t.dim * 4
        sb = pb * len(t.optimizer.slots)
        on_device = 0 if isinstance(t.placement, HostTable) else (pb + sb) // shards  # PS: host RAM
        where = repr(t.placement) + (" (auto)" if isinstance(declared.placement, Auto) else "")
        plans.append(NamespacePlan(t.name, "table", (rows, t.dim), where, t.placement.realm, pb, sb, on_device))
    _, dense = nnx.split(nnx.eval_shape(lambda: model.init_dense(nnx.Rngs(0))))
    dense = nnx.to_pure_dict(dense)
    shardings = dense_shardings(dense, getattr(model, "dense_partitioning", lambda: [])(), mesh)
    for name, sub in sorted(dense.items()):
        pb = _nbytes(sub)
        sb = _nbytes(jax.eval_shape(dense_tx.init, sub))
        leaves = jax.tree.leaves(sub)  # one array: its shape; a module: its parameter count
        shape = tuple(leaves[0].shape) if len(leaves) == 1 else (sum(int(np.prod(x.shape)) for x in leaves),)
        # split leaves (tensor parallel over `model`, stages over `stage`) cost a share per device
        split_axes, per_device = set(), 0
        for leaf, sh in zip(leaves, jax.tree.leaves(shardings[name])):
            axes = [a for a in sh.spec if a is not None]
            split_axes.update(axes)
            per_device += _nbytes(leaf) // axis_size(mesh, tuple(axes) or None)
        per_device = per_device * (pb + sb) // max(pb, 1)  # optimizer state splits like its params
        if "stage" in split_axes:
            where, realm = "Staged(stage)", 4
        elif split_axes:
            where, realm = f"TensorParallel({'+'.join(sorted(split_axes))})", 4
        else:
            where, realm = repr(Replicated()), 1
        plans.append(NamespacePlan(name, "dense", shape, where, realm, pb, sb, per_device))
    return plans


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def device_memory_bytes(mesh: Mesh) -> int | None:
    """Memory of one device of the mesh, when the backend reports it (GPU/TPU)."""
    try:
        stats = mesh.devices.flat[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may not implement it
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def format_plan(plans: list[NamespacePlan], mesh: Mesh) -> str:
    head = ("namespace", "kind", "shape", "placement", "realm", "bytes (+opt)", "per device")
    rows = [(p.name, p.kind, "x".join(map(str, p.shape)) or "scalar", p.placement, str(p.realm),
             _human(p.total_bytes), _human(p.bytes_per_device)) for p in plans]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"mesh {dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)",
             fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    per_dev = sum(p.bytes_per_device for p in plans)
    mem = device_memory_bytes(mesh)
    budget = f" of {_human(mem)}" if mem else ""
    lines.append(f"total {_human(sum(p.total_bytes for p in plans))}; "
                 f"per device {_human(per_dev)}{budget}")
    return "\n".join(lines)
