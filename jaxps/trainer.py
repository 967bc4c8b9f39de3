"""The training loop: `Trainer(model, mesh, config).fit(train, eval_data)`.

One host thread prepares batches ahead (hash ids, plan each table's lookup, place the
arrays on the mesh) while the device runs the previous step; the loop itself only
dispatches donated jitted steps and reads the loss back every `log_every` steps, so the
host never waits on the device in between.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from jaxps.checkpoint import Checkpointer
from jaxps.snapshot import read_npz, unflatten
from jaxps.data.batch import Batch
from jaxps.data.readers import prefetch
from jaxps.groups import WorkerGroup
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.metrics import StreamingBinaryMetrics
from jaxps.model import Model
from jaxps.plan import format_plan, plan_model
from jaxps.ps.client import PSClient
from jaxps.ps.server import PSServer
from jaxps.runtime import allgather_host, allreduce_sum_host, barrier, enable_compilation_cache, local_rows
from jaxps.step import StepBuilder, dense_optimizer


LOSS_LOG = "train_loss.jsonl"  # {"step", "loss"} per step, read back every log_every steps


def _trim_loss_log(path: str, step: int) -> None:
    """Keep the loss log's lines of steps <= `step` (where this fit starts): the file stays
    one curve -- a fresh run in an old out_dir starts it anew, a resumed run replaces the
    steps the killed run logged after its checkpoint."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


@dataclass
class TrainConfig:
    epochs: int = 1
    seed: int = 0
    dense_optimizer: str = "adagrad"
    dense_learning_rate: float = 0.05
    loss_reduction: str = "sum"    # gradients of the summed logloss (online-learning scale)
    log_every: int = 50            # steps between loss read-backs (each one syncs the host)
    out_dir: str = "runs/jaxps"
    checkpoint: bool = True        # Orbax checkpoint at the end (and every checkpoint_every)
    checkpoint_every: int = 0      # steps; 0 = only at the end
    keep_checkpoints: int = 3
    tensorboard: bool = True
    progress: bool = True
    prefetch: int = 3              # batches prepared ahead on a host thread
    max_inflight_steps: int = 2    # dispatched-but-unfinished device steps
    compilation_cache: str = "~/.cache/jaxps/xla"  # persistent XLA cache; "" = off
    ps_strict: bool = True         # host tables: exact sequential semantics despite prefetch
                                   # (SSP/ASP worker groups: read-my-writes); off: rows up to
                                   # prefetch + ps_max_inflight_pushes steps stale
    ps_max_inflight_pushes: int = 2  # host tables: pushes queued behind the device steps
    # Threads per server of the embedded (in-process) PS group: a pull or push of >= 16k
    # keys splits its partitions over them (PSServer threads; gRPC servers take --threads).
    # What it buys: the request path's lookups and row gathers on several cores at once; on
    # a fast accelerator that path, not the device, sets a HostTable step (H200: ~0.8 us per
    # key). Raise it on many-core hosts with fast accelerators (cores left over besides the
    # input, push and XLA threads); 1 where the PS shares a few cores with the device step.
    ps_threads: int = 1
    # Strict HostTable steps take the previous push's outcome on the rows they share with it
    # from a local apply on the push thread (bit-identical) instead of waiting for the
    # servers to apply it and pulling again (HostTables; one in-process server only). It
    # takes the push off a strict step's critical path but adds ~20k lookups and an update
    # per step: on 2 cores that extra work made strict steps slower (38-43 vs 35-37 ms), so
    # it is off until a many-core accelerator host's A/B (host_vs_device --also-local-apply)
    # says otherwise.
    ps_local_apply: bool = False

    def __post_init__(self):
        if self.loss_reduction not in ("sum", "mean"):
            raise ValueError(f"train.loss_reduction must be 'sum' or 'mean', got {self.loss_reduction!r}")
        for name in ("epochs", "log_every", "keep_checkpoints", "max_inflight_steps", "ps_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


def plans_of(host, plans: dict) -> dict:
    """The host-table subset of a batch's plans (the dense table's too, for worker groups)."""
    return {name: plans[name] for name in host.names}


class Trainer:
    def __init__(self, model: Model, mesh: Mesh | MeshConfig | None = None,
                 config: TrainConfig | None = None, ps: PSClient | None = None,
                 group: WorkerGroup | None = None):
        """ps: the server group of the host tables (default: embedded in this process).
        group: this trainer is one of several worker groups sharing `ps` (jaxps.groups);
        each group writes its metrics and checkpoints under out_dir/group-<i>."""
        self.model = model
        self.config = config or TrainConfig()
        self._group_root = self.config.out_dir  # where every group's out_dir lies
        if group is not None and group.count > 1:
            self.config = dataclasses.replace(self.config,
                                              out_dir=os.path.join(self.config.out_dir, f"group-{group.index}"))
        self.group = group
        enable_compilation_cache(self.config.compilation_cache)
        self.mesh = mesh if isinstance(mesh, Mesh) else make_mesh(mesh)
        self.steps = StepBuilder(model, self.mesh, dense_optimizer(
            self.config.dense_optimizer, self.config.dense_learning_rate), self.config.loss_reduction, ps,
            self.config.ps_strict, self.config.ps_max_inflight_pushes, group,
            (self.config.dense_optimizer, self.config.dense_learning_rate), self.config.ps_threads)
        if self.steps.host is not None:
            self.steps.host.local_apply = self.config.ps_local_apply
            if self.config.ps_local_apply and not self.steps.host.local_apply_eligible:
                warnings.warn("train.ps_local_apply is on but not used: it needs strict, one in-process PS "
                              "server, no worker group, no admission (min_count) or eviction (max_rows)",
                              stacklevel=2)
        if group is not None and group.count > 1 and not group.policy.bsp and self.steps.host is not None:
            # SSP/ASP: periodic checkpoints read cuts the servers copy at those steps (BSP
            # needs none: its steps settle one at a time)
            self.steps.host.cut_every = self.config.checkpoint_every
            bound = PSServer.MAX_PENDING_CUTS * self.config.checkpoint_every
            staleness = group.policy.staleness
            if self.config.checkpoint_every and (staleness is None or staleness > bound):
                warnings.warn(f"worker group sync {group.policy} with train.checkpoint_every="
                              f"{self.config.checkpoint_every}: a group more than {bound} steps ahead of the "
                              f"slowest waits at its push (the servers keep at most "
                              f"{PSServer.MAX_PENDING_CUTS} pending cuts), a tighter bound than the sync's",
                              stacklevel=2)
        self.state = self.steps.init_state(self.config.seed)
        self.history: list[dict] = []
        self._checkpointer: Checkpointer | None = None
        self._position = (0, 0)               # (epoch, batches of it trained): the data position
        self._resume_at: tuple[int, int] | None = None  # set by resume(): where fit() continues
        self.ps_restored: dict | None = None  # set by restore() on the one process that loaded the PS

    # ------------------------------------------------------------------ info
    def plan(self) -> str:
        return format_plan(plan_model(self.model, self.mesh, self.steps.dense_tx), self.mesh)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    # ------------------------------------------------------------------ loops
    def _prepared(self, data: Iterable[Batch], training: bool = False) -> Iterator[tuple[Batch, dict, Any]]:
        """(batch, plans, device batch); close it when done (its thread uses the routers).
        `training`: the pulls are a worker group's steps (made at its clock)."""
        host = self.steps.host

        def prepare():
            for b in data:
                plans = self.steps.plan_batch(b)
                pulled = host.pull(plans_of(host, plans), training) if host is not None else None
                yield b, plans, self.steps.to_device(b, plans), pulled

        def finish(items):
            for b, plans, dev, pulled in items:
                if pulled is not None:  # host rows: repaired against pushes issued since
                    rows, mark = pulled
                    host.repair(plans_of(host, plans), rows, mark)
                    dev = self.steps.put_host_rows(dev, rows)
                yield b, plans, dev

        if jax.process_count() > 1 or not self.config.prefetch:
            # multi-process plans gather ids across processes (a collective): issue them
            # from this thread, in step order; parsing still runs ahead in the dataset
            return finish(prepare())
        return finish(prefetch(prepare(), self.config.prefetch))

    def fit(self, train: Iterable[Batch], eval_data: Iterable[Batch] | None = None,
            total_examples: int | None = None, report: dict | None = None) -> dict:
        """Train for `config.epochs` passes over `train` (re-iterated per epoch), then
        evaluate, write metrics JSON (with `report` merged in), TensorBoard scalars and a
        checkpoint. If training fails, the scalars and checkpoints already started are
        still flushed to disk."""
        cfg = self.config
        os.makedirs(cfg.out_dir, exist_ok=True)
        writer = _tensorboard(cfg) if cfg.tensorboard and jax.process_index() == 0 else None
        bar = _progress(cfg, total_examples * cfg.epochs if total_examples else None)
        pending: list[tuple[int, jax.Array]] = []
        examples, t0 = 0, time.perf_counter()
        first_step_seconds = None
        running: list[float] = []
        host_step = self.step  # counted on the host: reading state["step"] would sync
        if jax.process_index() == 0:
            _trim_loss_log(os.path.join(cfg.out_dir, LOSS_LOG), host_step)
        host = self.steps.host
        start_epoch, skip = self._resume_at or (0, 0)
        if host is not None:
            host.begin(host_step)
            if self._resume_at is not None and self.group is not None and self.group.count > 1:
                host.wait_for_restore(host_step)  # every process resumed there; group 0 loaded the PS
        self._resume_at = None
        try:
            for epoch in range(start_epoch, cfg.epochs):
                done = skip if epoch == start_epoch else 0
                self._position = (epoch, done)
                data = itertools.islice(train, done, None) if done else train  # already trained
                with contextlib.closing(self._prepared(data, training=True)) as batches:
                    for batch, plans, dev in batches:
                        self.state, m = self.steps.train_step(self.state, dev)
                        host_step += 1
                        done += 1
                        self._position = (epoch, done)
                        if self.steps.host is not None:  # servers apply the row gradients
                            self.steps.host.push(plans_of(self.steps.host, plans), m["host_grads"], host_step)
                        pending.append((host_step, m["loss"]))
                        if len(pending) > cfg.max_inflight_steps:
                            # bound the steps queued on the device: XLA:CPU's in-process
                            # collectives can deadlock with many collective programs queued
                            # (seen with 8 simulated devices on 2 cores), and it bounds memory
                            jax.block_until_ready(pending[-1 - cfg.max_inflight_steps][1])
                        n = batch.num_real
                        examples += n
                        if bar is not None:
                            bar.update(n)
                        if first_step_seconds is None:
                            jax.block_until_ready(m["loss"])
                            first_step_seconds = time.perf_counter() - t0
                        if len(pending) >= cfg.log_every:
                            running = self._flush(pending, writer, examples, t0, bar)
                        if cfg.checkpoint_every and host_step % cfg.checkpoint_every == 0:
                            self.save(host_step)
            self._position = (cfg.epochs, 0)
            jax.block_until_ready(self.state)
            if host is not None:
                host.finish()
            if self.steps.dense_table is not None:  # the dense parameters every group trained
                self.state = self.steps.set_dense(self.state, host.pull_dense(final=True))
            if pending:
                running = self._flush(pending, writer, examples, t0, bar)
            seconds = time.perf_counter() - t0
            counts = allreduce_sum_host({"examples": examples})
            result: dict[str, Any] = {
                "train": {
                    "steps": self.step, "examples": int(counts["examples"]), "seconds": seconds,
                    "examples_per_sec": counts["examples"] / seconds if seconds else 0.0,
                    "first_step_seconds": first_step_seconds,
                    "final_loss": float(np.mean(running)) if running else None,
                },
                "tables": {n: {"capacity": r.capacity, "overflows": r.overflows}
                           for n, r in self.steps.routers.items()},
            }
            if self.steps.host is not None:  # per table, summed over the servers
                result["ps"] = self.steps.host.stats()
            if eval_data is not None:
                result["eval"] = self.evaluate(eval_data)
                if writer is not None:
                    for k in ("logloss", "auc"):
                        writer.add_scalar(f"eval/{k}", result["eval"][k], self.step)
            if cfg.checkpoint:
                self._save_final()
                result["checkpoint"] = os.path.join(self.checkpointer.directory, str(self.step))
        finally:
            if self.steps.host is not None and sys.exc_info()[0] is not None:
                try:  # let queued pushes land; the training error stays the one raised
                    self.steps.host.flush()
                except Exception:  # noqa: BLE001
                    pass
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if self._checkpointer is not None:
                self._checkpointer.wait()
        result.update(report or {})
        self.write_metrics(result)
        return result

    def _flush(self, pending, writer, examples, t0, bar) -> list[float]:
        losses = [float(l) for _, l in pending]
        rate = examples / max(time.perf_counter() - t0, 1e-9)
        if writer is not None:
            for s, l in zip((s for s, _ in pending), losses):
                writer.add_scalar("train/loss", l, s)
            writer.add_scalar("train/examples_per_sec", rate, pending[-1][0])
        if bar is not None:
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        records = [{"step": s, "loss": l} for (s, _), l in zip(pending, losses)]
        self.history.extend(records)
        if jax.process_index() == 0:  # appended: `fit` first drops the lines past its start step
            with open(os.path.join(self.config.out_dir, LOSS_LOG), "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        pending.clear()
        return losses

    def _predict_batches(self, data: Iterable[Batch]) -> Iterator[tuple[Batch, np.ndarray]]:
        with contextlib.closing(self._prepared(data)) as batches:
            for batch, _, dev in batches:
                yield batch, local_rows(self.steps.eval_step(self.state, dev))

    def evaluate(self, data: Iterable[Batch]) -> dict:
        """Streaming logloss and AUC over `data` (padding rows ignored; with several
        processes, over every process's rows)."""
        metrics = StreamingBinaryMetrics()
        for batch, probs in self._predict_batches(data):
            metrics.update(probs, batch.labels, batch.weights)
        if jax.process_count() > 1:  # every process scored its own rows: add them up
            state = {k: allgather_host(v).sum(axis=0) for k, v in metrics.state().items()}
            metrics = StreamingBinaryMetrics.from_state(state)
        return metrics.result()

    def predict(self, data: Iterable[Batch]) -> np.ndarray:
        """Predicted probabilities of this process's real (non-padding) rows, in order."""
        out = [probs[batch.weights > 0] for batch, probs in self._predict_batches(data)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    # ------------------------------------------------------------------ persistence
    @property
    def checkpointer(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(os.path.join(self.config.out_dir, "checkpoints"),
                                              max_to_keep=self.config.keep_checkpoints)
        return self._checkpointer

    def _layout_meta(self) -> dict:
        """Logical shapes a checkpoint must match to be restored into this trainer: table
        rows before shard padding with their optimizer slots, and every other array."""
        tables = {n: {"rows": lay.table.rows, "dim": lay.table.dim,
                      "slots": sorted(lay.table.optimizer.slots)}
                  for n, lay in self.steps.layouts.items()}
        rest = {k: v for k, v in self.state.items() if k != "tables"}
        shapes = {jax.tree_util.keystr(p): list(a.shape)
                  for p, a in jax.tree_util.tree_leaves_with_path(rest)}
        return {"tables": tables, "shapes": shapes}

    def _writes_ps(self) -> bool:
        """This trainer writes the PS snapshot: one writer per job (group 0's process 0)."""
        return (self.steps.host is not None and jax.process_index() == 0
                and (self.group is None or self.group.index == 0))

    def save(self, step: int | None = None) -> None:
        """Start a hot checkpoint of the whole train state at the current step (`step`: the
        loop's count of it, so as not to wait for the device to read it). The servers mark
        the host tables' rows on the push thread right after this step's pushes (for worker
        groups: once every group's pushes of this step are applied), so they match the
        device state, and a copy thread copies them while training and pushes go on
        (HostTables.snapshot_async); the device state is copied on the device and handed
        to Orbax on a checkpoint thread (Checkpointer.save). Orbax writes both in the
        background, as one step (jaxps.snapshot)."""
        step = self.step if step is None else step
        meta = {"step": step, "routers": {n: r.capacity for n, r in self.steps.routers.items()},
                "data": {"epoch": self._position[0], "batches": self._position[1]},
                **self._layout_meta()}
        ps = None
        host, multi = self.steps.host, jax.process_count() > 1
        if host is not None and multi:  # every process's pushes of this step land first
            host.flush()
            barrier()
        if self._writes_ps():  # a future: the rows as they are once this step's pushes landed
            ps = host.snapshot_async(step, wait_for_mark=multi)
            meta["ps_tables"] = sorted(host.names)
        if host is not None and multi:  # and none of the next step's before the mark
            barrier()
        self.checkpointer.save(step, self.state, meta, ps=ps)

    def close(self) -> None:
        """Wait for checkpoints being written, let queued PS pushes land, and stop the host
        tables' threads (and an embedded PS group this trainer made). The trainer is done
        after it; `with Trainer(...) as t:` calls it."""
        try:
            if self._checkpointer is not None:
                self._checkpointer.wait()
        finally:
            if self.steps.host is not None:
                self.steps.host.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _save_final(self) -> None:
        """The checkpoint at the end of fit(); a periodic one may already hold this step
        (worker groups replace it: their dense parameters were only now pulled whole)."""
        self.checkpointer.wait()
        if self.step in self.checkpointer.steps():
            if self.group is None:
                return
            self.checkpointer.delete(self.step)
        self.save()

    def _legacy_ps_path(self, step: int) -> str:
        """Where checkpoints written before hot checkpoints kept the PS rows."""
        return os.path.join(self.config.out_dir, "ps_snapshots", f"{step}.npz")

    def _complete(self, ckpt: Checkpointer, step: int) -> bool:
        return ckpt.has_ps(step) or os.path.exists(self._legacy_ps_path(step))

    def latest_complete_step(self) -> int | None:
        """The latest step a resume can start from: its device state is written and, with
        host tables, the PS snapshot too; with worker groups, every group's state at that
        step (each group saved its own under <out_dir>/group-<i>) and group 0's snapshot."""
        if self.group is None or self.group.count == 1:
            steps = self.checkpointer.steps()
            if self.steps.host is not None:
                steps = [s for s in steps if self._complete(self.checkpointer, s)]
            return max(steps, default=None)
        common: set[int] | None = None
        first: Checkpointer | None = None
        for g in range(self.group.count):
            folder = os.path.join(self._group_root, f"group-{g}", "checkpoints")
            if not os.path.isdir(folder):
                return None
            ckpt = self.checkpointer if g == self.group.index else Checkpointer(folder, read_only=True)
            first = ckpt if g == 0 else first
            common = set(ckpt.steps()) if common is None else common & set(ckpt.steps())
        return max((s for s in common if first.has_ps(s)), default=None)

    def resume(self) -> int | None:
        """Restore the latest complete checkpoint (`latest_complete_step`) so that the next
        fit() continues where it stopped, data position included. Returns the step, or
        None (and changes nothing) when there is no checkpoint yet."""
        step = self.latest_complete_step()
        if step is None:
            return None
        self.restore(step)
        self._resume_at = self._position
        return step

    def restore(self, step: int | None = None) -> int:
        """Restore the latest (or given) checkpoint onto this trainer's mesh, which may have
        another shape than the one that wrote it, and its PS snapshot onto this trainer's
        servers, however many. One process reads and loads the snapshot, the one that writes
        it (group 0's process 0); the others wait for it (this job's processes at a barrier,
        other worker groups at the servers' clocks: HostTables.wait_for_restore)."""
        step = self.latest_complete_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.checkpointer.directory}")
        saved, mine = self.checkpointer.meta(step), self._layout_meta()
        for kind in ("tables", "shapes"):
            for name, want in mine[kind].items():
                have = saved.get(kind, {}).get(name)
                if have is not None and have != want:
                    raise ValueError(f"checkpoint {self.checkpointer.directory}/{step}: {name} is "
                                     f"{have}, this model has {want}")
        # Only the shard padding of table rows may differ now: let Orbax pad or truncate
        # it (a checkpoint without layout metadata restores strictly). Free the current
        # state first: restoring next to it would need twice the largest namespace.
        like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            self.state)
        if self.steps.host is not None and (self.group is None or self.group.index == 0):
            if not self._complete(self.checkpointer, step):  # every process fails alike
                raise ValueError(f"checkpoint {self.checkpointer.directory}/{step} has no snapshot of the "
                                 f"host tables {sorted(self.steps.host.names)}")
            if self._writes_ps():  # one reader restores the servers (however many); the rest wait
                self.ps_restored = self._load_ps(step)
        if self.steps.host is not None and jax.process_count() > 1:
            barrier()  # no process pulls before the snapshot is loaded
        self.state = None
        self.state, meta = self.checkpointer.restore(like, step, pad_rows="tables" in saved)
        for name, cap in (meta.get("routers") or {}).items():
            if name in self.steps.routers and cap:
                self.steps.routers[name].capacity = int(cap)
        data = meta.get("data") or {}
        self._position = (int(data.get("epoch", 0)), int(data.get("batches", 0)))
        return self.step

    def _load_ps(self, step: int) -> dict:
        """Read step's PS snapshot (this process alone) and load it into the servers, where
        their ring puts each row. Returns what was loaded, for the report."""
        if self.checkpointer.has_ps(step):
            snap = self.checkpointer.ps_snapshot(step)
        else:
            snap = unflatten(read_npz(self._legacy_ps_path(step)))
        self.steps.host.load(snap)
        return {"step": step, "rows": {name: int(rows["keys"].shape[0]) for name, rows in snap.items()},
                "servers": len(self.steps.host.ps.ring.servers)}

    def write_metrics(self, result: dict) -> str:
        """metrics.json (process 0); NaN (e.g. AUC with one class) is written as null."""
        path = os.path.join(self.config.out_dir, "metrics.json")
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(_finite(result), f, indent=2, allow_nan=False)
        return path


def _finite(x: Any) -> Any:
    """A JSON-ready copy: dataclasses as dicts, numpy scalars as Python, NaN/inf as None."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _finite(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _tensorboard(cfg: TrainConfig):
    from tensorboardX import SummaryWriter
    return SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))


def _progress(cfg: TrainConfig, total: int | None):
    if not cfg.progress or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="ex", unit_scale=True, dynamic_ncols=True, desc="train")
