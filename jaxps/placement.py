"""Placements: where a parameter namespace lives, and the one function that turns a
placement into a sharding.

Realm 1 is `Replicated` (data parallel), realm 2 is `RowSharded` on the mesh (or
`HostTable` in the host parameter server), realm 3 is `Blocked`, realm 4 is `Staged`. Each
adds a class here and a case in `partition_spec`; the step builder tells device tables
from host tables and blocked tables from row-sharded ones (how a batch reaches them),
nothing else dispatches on the type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from jaxps.mesh import AXES, axis_size
from jaxps.parallel.schedule import DEFAULT, KINDS

if TYPE_CHECKING:  # JAX only where shardings are built: a PS server reads placements too
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

AxisNames = str | tuple[str, ...]


@dataclass(frozen=True)
class Replicated:
    """Every device holds the whole namespace; gradients are all-reduced over `data`."""

    realm: ClassVar[int] = 1


@dataclass(frozen=True)
class RowSharded:
    """Rows split in contiguous blocks over a mesh axis (or several); each step only
    the touched rows move and only they are updated."""

    axis: AxisNames = "data"
    realm: ClassVar[int] = 2

    def axes(self) -> tuple[str, ...]:
        return (self.axis,) if isinstance(self.axis, str) else tuple(self.axis)


@dataclass(frozen=True)
class Blocked:
    """Realm 3: examples too wide for one device. The rows (the feature dimension) are cut
    into blocks over `axis` as `RowSharded` cuts them, and so is every example: the host
    splits each example's nonzeros by owner block, device b sees only block b's features
    of every example, its partial sum (val-weighted rows) is summed over `axis` with one
    `psum`, and each block's row gradients never leave its device. A table read this way
    reaches the model sum-pooled: [B, dim] per example (`jaxps.model.sum_pool`)."""

    axis: str = "model"
    realm: ClassVar[int] = 3

    def axes(self) -> tuple[str, ...]:
        return (self.axis,)


@dataclass(frozen=True)
class HostTable:
    """Rows live in host RAM of the parameter-server group: tables larger than the
    accelerators' memory. Each step pulls the rows its batch touches and pushes their
    gradients; the servers apply the row-wise optimizer.

    kind: "collisionless" (raw 64-bit ids are keys; storage grows with the keys seen;
    the table's `rows` is only a planning estimate) or "hashed" (ids hash to `rows` rows).
    min_count: admission: an id is stored from its min_count-th push on (rare ids, most of
        a click log's, then cost nothing); until then its gradients are dropped, counted.
    max_rows: eviction: a row budget for the whole table; past it, each partition drops
        its least recently pushed rows (a dropped id reads as its initial row again).
    """

    kind: str = "collisionless"
    min_count: int = 1
    max_rows: int | None = None
    realm: ClassVar[int] = 2

    def __post_init__(self):
        if self.kind not in ("collisionless", "hashed"):
            raise ValueError(f"HostTable kind must be 'collisionless' or 'hashed', got {self.kind!r}")


@dataclass(frozen=True)
class Staged:
    """A stack of layers cut into pipeline stages over the `stage` axis (realm 4): each
    device holds its stage's layers; microbatches flow stage to stage with `ppermute`
    (jaxps.parallel.pipeline). A dense namespace property, declared by the model."""

    axis: str = "stage"
    microbatches: int = 4
    schedule: str = DEFAULT  # one of SCHEDULES (jaxps.parallel.schedule), run with the loss inside
    realm: ClassVar[int] = 4
    # one chunk per stage: every kind but the interleaved ones
    SCHEDULES: ClassVar[tuple[str, ...]] = tuple(k for k in KINDS if "interleaved" not in k)

    def __post_init__(self):
        if self.axis != "stage":  # the executor's ppermutes and the model's rules name it
            raise ValueError(f"Staged pipelines over the 'stage' mesh axis, got axis={self.axis!r}")
        if self.microbatches < 1:
            raise ValueError(f"Staged microbatches must be >= 1, got {self.microbatches}")
        if self.schedule not in self.SCHEDULES:
            raise ValueError(f"Staged schedule must be one of {', '.join(self.SCHEDULES)}, got {self.schedule!r}")


@dataclass(frozen=True)
class Auto:
    """`RowSharded(axis)` when the table (with its optimizer slots) fits
    `budget_fraction` of each device's memory, else `HostTable(host_kind)`. Resolved once,
    when the trainer builds its steps (`jaxps.plan.resolve`); `jaxps plan` shows the choice."""

    axis: AxisNames = "data"
    host_kind: str = "hashed"
    budget_fraction: float = 0.5
    realm: ClassVar[int] = 2


Placement = Replicated | RowSharded | Blocked | HostTable | Staged | Auto


def validate(placement: Placement, mesh: Mesh | None = None) -> None:
    if isinstance(placement, RowSharded):
        axes = placement.axes()
        for a in axes:
            if a not in AXES:
                raise ValueError(f"RowSharded axis {a!r} is not a mesh axis {AXES}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"RowSharded axes {axes} name an axis twice")
    if isinstance(placement, Blocked):
        if placement.axis not in AXES or placement.axis == "data":
            raise ValueError(f"Blocked axis must be 'stage' or 'model' (the batch is split over 'data'), "
                             f"got {placement.axis!r}")


def partition_spec(placement: Placement, ndim: int) -> PartitionSpec:
    """The PartitionSpec of an array of rank `ndim` held under `placement`."""
    from jax.sharding import PartitionSpec as P

    if isinstance(placement, Replicated):
        return P()
    if isinstance(placement, (RowSharded, Blocked)):
        axes = placement.axes()
        return P(axes if len(axes) > 1 else axes[0], *([None] * (ndim - 1)))
    if isinstance(placement, HostTable):
        raise TypeError("a HostTable lives in the parameter server; it has no device sharding")
    if isinstance(placement, Auto):
        raise TypeError("an Auto placement is resolved (jaxps.plan.resolve) before it is sharded")
    raise TypeError(f"unknown placement {placement!r}")


def sharding_for(placement: Placement, mesh: Mesh, ndim: int) -> NamedSharding:
    from jax.sharding import NamedSharding

    validate(placement, mesh)
    return NamedSharding(mesh, partition_spec(placement, ndim))


def row_shards(placement: Placement, mesh: Mesh) -> int:
    """How many pieces the rows of a table are cut into."""
    if isinstance(placement, Auto):
        return axis_size(mesh, placement.axis)
    return axis_size(mesh, placement.axes()) if isinstance(placement, (RowSharded, Blocked)) else 1


def row_axes(placement: Placement) -> AxisNames | None:
    """Mesh axes the rows are split over (None when not split)."""
    if isinstance(placement, (RowSharded, Blocked)):
        axes = placement.axes()
        return axes if len(axes) > 1 else axes[0]
    return None


def parse(text: str) -> Placement:
    """Placement from config text: 'replicated', 'row_sharded', 'row_sharded:model',
    'row_sharded:data+model', 'blocked', 'blocked:stage', and for a dense tower
    'staged[:microbatches[:schedule]]' (e.g. 'staged:8:1f1b')."""
    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    if kind == "replicated":
        return Replicated()
    if kind in ("host", "host_table", "hosttable"):
        return HostTable(arg or "collisionless")
    if kind == "auto":
        return Auto(arg or "data")
    if kind == "staged":
        m, _, schedule = arg.partition(":")
        try:
            return Staged(microbatches=int(m) if m else 4, schedule=schedule or DEFAULT)
        except ValueError as e:
            raise ValueError(f"placement {text!r}: {e}") from None
    if kind == "blocked":
        placement = Blocked(arg or "model")
        validate(placement)
        return placement
    if kind in ("row_sharded", "rowsharded"):
        axes = tuple(a for a in arg.split("+") if a) or ("data",)
        placement = RowSharded(axes[0] if len(axes) == 1 else axes)
        validate(placement)
        return placement
    raise ValueError(f"unknown placement {text!r}; use 'replicated', 'row_sharded[:axis[+axis]]', "
                     "'blocked[:axis]', 'host[:collisionless|hashed]' or 'auto[:axis]'")
