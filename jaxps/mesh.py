"""The device mesh: named axes `data`, `stage`, `model` over all devices of the job.

Axes are `Auto` (GSPMD propagation) so ordinary jitted model code composes with sharded
inputs; the places that need per-shard control (table routing) use `jax.shard_map`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # JAX is imported where a mesh is built: placement math stays light
    from jax.sharding import Mesh

AXES = ("data", "stage", "model")


@dataclass
class MeshConfig:
    """Axis sizes; -1 means "all remaining devices" (at most one axis may say so)."""

    data: int = -1
    stage: int = 1
    model: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.stage, self.model]
        for name, s in zip(AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name}={s}: an axis size is a positive integer or -1")
        free = [i for i, s in enumerate(sizes) if s == -1]
        if len(free) > 1:
            raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(AXES, sizes))}")
        fixed = math.prod(s for s in sizes if s != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(f"mesh: {num_devices} devices do not divide by the fixed axes "
                                 f"{dict(zip(AXES, sizes))}")
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                             f"the job has {num_devices}")
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | None = None, devices: list | None = None) -> Mesh:
    """Build the job's mesh over `devices` (default: every device of every process)."""
    import jax
    from jax.sharding import AxisType

    config = config or MeshConfig()
    devices = devices if devices is not None else jax.devices()
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    """Number of shards along one axis or a tuple of axes (1 for None)."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)
