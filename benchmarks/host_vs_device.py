"""Wide&Deep step time with the embedding table in the host PS vs on the mesh.

Same model, same batches; only the embedding table's placement differs: `RowSharded` on
the mesh, or `HostTable` in an embedded (in-process) PS group, with pulls prefetched on
the input thread and pushes queued behind the device steps — strict (exact, repairs rows
shared with in-flight pushes) and non-strict (bounded staleness). Reported: seconds per
step of each and `ratio` = strict HostTable / RowSharded (target <= 1.15).
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from jaxps.data import PlantedModel, SyntheticConfig  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.models import WideDeep, WideDeepConfig  # noqa: E402
from jaxps.placement import HostTable, RowSharded  # noqa: E402
from jaxps.trainer import TrainConfig, Trainer  # noqa: E402


def seconds_per_step(placement, batches, args, strict=True) -> tuple[float, dict]:
    model = WideDeep(WideDeepConfig(num_slots=39, embed_rows=args.rows, embed_dim=args.dim,
                                    wide_rows=args.rows, hidden=(256, 128), embed_placement=placement))
    mesh = make_mesh(MeshConfig(data=args.devices), jax.devices()[:args.devices])
    t = Trainer(model, mesh, TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                         log_every=10_000, dense_optimizer="adam", dense_learning_rate=1e-3,
                                         compilation_cache="", ps_strict=strict))
    t.fit(batches[:3])  # compile and warm the tables
    t0 = time.perf_counter()
    t.fit(batches)
    dt = (time.perf_counter() - t0) / len(batches)
    extra = {"repaired_rows": t.steps.host.repaired_rows} if t.steps.host is not None else {}
    return dt, extra


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--rows", type=int, default=1 << 22, help="hashed rows of both tables")
    p.add_argument("--devices", type=int, default=1)
    args = p.parse_args(argv)
    steps = 12 if args.quick else 40
    planted = PlantedModel(SyntheticConfig(num_fields=39, vocab_size=10_000, seed=0))
    data, _ = planted.sample(args.batch * steps, seed=1)
    batches = [data.slice(i, i + args.batch) for i in range(0, data.size, args.batch)]
    device_s, _ = seconds_per_step(RowSharded("data"), batches, args)
    host_s, host_extra = seconds_per_step(HostTable("hashed"), batches, args, strict=True)
    loose_s, _ = seconds_per_step(HostTable("hashed"), batches, args, strict=False)
    emit("host_vs_device", {
        "batch_size": args.batch, "embed_dim": args.dim, "rows": args.rows, "steps": steps,
        "devices": args.devices, "seconds_per_step_device": device_s,
        "seconds_per_step_host_strict": host_s, "seconds_per_step_host_nonstrict": loose_s,
        "ratio": host_s / device_s, "ratio_nonstrict": loose_s / device_s,
        "repaired_rows_strict": host_extra.get("repaired_rows"), "machine": machine_info(),
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
