"""Builds the jitted train/eval steps of a model from its namespaces' placements.

Data path of one train step (see DESIGN.md):
  host: ids -> rows (hash) -> LookupPlan per table (dedup, bucket by owner shard);
        HostTable namespaces: dedup -> rows pulled from the PS (jaxps.host_tables)
        Blocked namespaces: the same plan, and each example's nonzeros split by owner block
  device: gather planned unique rows per shard (or take the pulled block) -> occurrence
          gather in the global view (Blocked: a per-block partial sum, psum'd over its axis)
          -> forward/backward w.r.t. (dense params, unique rows)
          -> optax on dense, row-wise optimizer on exactly the unique rows of each mesh
          table; a HostTable's unique-row gradients go back to the host to be pushed.
A gradient of a whole table never exists: differentiation is w.r.t. the unique rows only.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxps.data.batch import Batch
from jaxps.dense_table import DENSE_TABLE, DenseTable
from jaxps.groups import WorkerGroup
from jaxps.model import Model
from jaxps.host_tables import HostTables, ProcessShare
from jaxps.placement import Blocked, HostTable, row_axes, row_shards, sharding_for
from jaxps.parallel.blocked import BlockedBatch, blocked_pool, split_by_block
from jaxps.parallel.tensor import dense_shardings
from jaxps.plan import resolve
from jaxps.ps.client import PSClient
from jaxps.ps.initrows import init_rows
from jaxps.runtime import allgather_host, local_rows as process_local_rows
from jaxps.tables.routing import Router
from jaxps.tables.routing import warm_up as routing_warm_up
from jaxps.tables.sharded import apply_rows, gather_unique
from jaxps.tables.table import Table

State = dict[str, Any]


def logloss_terms(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example binary cross-entropy from logits; softplus keeps it stable and, unlike
    the max/abs form, differentiable at logit 0 (where every fresh model starts)."""
    return jax.nn.softplus(logits) - logits * labels


@dataclass
class TableLayout:
    table: Table
    shards: int
    rows_per_shard: int
    axis: Any
    blocked: bool = False  # realm 3: examples reach it split by owner block (jaxps.parallel.blocked)


class StepBuilder:
    """Owns the compiled steps and the host-side preparation of batches for them."""

    def __init__(self, model: Model, mesh: Mesh, dense_tx: optax.GradientTransformation,
                 loss_reduction: str = "sum", ps: PSClient | None = None, ps_strict: bool = True,
                 ps_max_inflight_pushes: int = 2, group: WorkerGroup | None = None,
                 dense_row_optimizer: tuple[str, float] = ("adagrad", 0.05), ps_threads: int = 1):
        """loss_reduction: gradients of the summed ("sum", the online-learning convention
        that VW and FTRL papers use: each example counts fully, whatever the batch size)
        or the mean ("mean") logloss of the batch. The reported loss is always the mean.
        ps: the parameter-server group of the model's HostTable namespaces (default: an
        embedded in-process group); ps_strict, ps_max_inflight_pushes, ps_threads: see HostTables.
        group: this trainer is one worker group of several (jaxps.groups): every namespace
        lives in the PS, the dense parameters as one table updated there by
        `dense_row_optimizer` (name, learning rate) instead of `dense_tx`. A group may span
        several processes (its own jax.distributed job): each reports its own clock."""
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self.model, self.mesh, self.dense_tx = model, mesh, dense_tx
        self.loss_reduction = loss_reduction
        self.layouts: dict[str, TableLayout] = {}  # tables on the mesh
        host: list[Table] = []
        names: set[str] = set()
        for declared in model.tables():
            t = resolve(declared, mesh)  # an Auto placement becomes RowSharded or HostTable
            if t.name in names:
                raise ValueError(f"two tables are named {t.name!r}")
            names.add(t.name)
            if isinstance(t.placement, HostTable):
                host.append(t)
                continue
            if group is not None:
                raise ValueError(f"table {t.name!r} is placed {type(t.placement).__name__} on the mesh, but a "
                                 f"job of {group.count} worker groups keeps every table in the PS: "
                                 f"set its placement to host")
            s = row_shards(t.placement, mesh)
            rows_per_shard = t.padded_rows(s) // s
            if rows_per_shard >= 2**31:  # plans index a shard's rows with int32
                raise ValueError(f"table {t.name!r}: {rows_per_shard} rows per shard exceed int32 "
                                 f"indexing; split it over more shards")
            self.layouts[t.name] = TableLayout(t, s, rows_per_shard, row_axes(t.placement),
                                               isinstance(t.placement, Blocked))
        self.routers = {n: Router(l.rows_per_shard, l.shards, l.table.capacity,
                                  num_rows=l.table.rows, salt=l.table.salt)
                        for n, l in self.layouts.items()}
        self.block_widths: dict[str, int] = {}  # Blocked tables: nonzeros per (block, example), grown
        if group is not None:  # a group of several processes keeps one server clock per process
            group = dataclasses.replace(group, processes=jax.process_count(), process=jax.process_index())
        # load the routing kernel while JAX initialises the state (it takes ~0.1-0.3 s)
        threading.Thread(target=routing_warm_up, daemon=True, name="jaxps-route-warmup").start()
        self.graphdef, shapes = nnx.split(model.init_dense(nnx.Rngs(0)))
        self.group = group
        self.dense_table = (DenseTable.of(nnx.to_pure_dict(shapes), *dense_row_optimizer)
                            if group is not None else None)
        # BSP sums the groups' gradients: with mean-reduced losses each group's is scaled
        # by 1/groups, so G groups equal one group on the combined batch either way
        self.grad_scale = 1.0 / group.count if group is not None and loss_reduction == "mean" else 1.0
        self.host = (HostTables(host, ps, ps_strict, ps_max_inflight_pushes, group, self.dense_table, ps_threads)
                     if host or group is not None else None)
        if self.host is not None and jax.process_count() > 1:  # gradients of this process's rows
            self.host.local_rows = process_local_rows
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.replicated = NamedSharding(mesh, P())
        self.train_step: Callable | None = None  # compiled for the state init_state builds
        self.eval_step = jax.jit(self._eval_step)
        self._process_order_cache: dict[int, tuple[list[int], int]] = {}

    # ---------------------------------------------------------------- state
    def init_state(self, seed: int = 0) -> State:
        key = jax.random.key(seed)
        dense_key = jax.random.split(key)[0]
        _, dense = nnx.split(self.model.init_dense(nnx.Rngs(dense_key)))
        dense = nnx.to_pure_dict(dense)
        # replicated (data parallel), unless the model names axes to split over `model`
        partitioning = getattr(self.model, "dense_partitioning", lambda: [])()
        dense = jax.device_put(dense, dense_shardings(dense, partitioning, self.mesh))
        tables = {}
        for name, lay in sorted(self.layouts.items()):
            tables[name] = self._init_table(lay)
        if self.dense_table is not None:  # the first group to arrive seeds the PS; later ones pull it
            self.host.ps.load(DENSE_TABLE, self.dense_table.host_rows(dense), only_missing=True)
            dense_opt = {}  # the servers hold the optimizer slots
        else:
            dense_opt = self._on_mesh(jax.jit(self.dense_tx.init)(dense))  # slots follow the params
        state = {
            "step": jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
            "dense": dense,
            "dense_opt": dense_opt,
            "tables": tables,
        }
        # The donated train step. Its output state keeps the input state's shardings: left
        # to itself XLA returns P() for a table on a size-1 axis, and the next call would
        # compile a second program for the changed input shardings.
        metrics = self.replicated
        if self.host is not None and jax.process_count() > 1:  # row gradients stay with their owners
            metrics = {"loss": self.replicated, "examples": self.replicated,
                       "host_grads": {name: self.batch_sharding for name in self.host.names}}
        self.train_step = jax.jit(self._train_step, donate_argnums=0,
                                  out_shardings=(jax.tree.map(lambda a: a.sharding, state), metrics))
        return state

    def _on_mesh(self, tree: Any) -> Any:
        """Leaves XLA left on one device (e.g. optax's step counter) replicated on the mesh."""
        def place(a):
            sh = a.sharding
            return a if isinstance(sh, NamedSharding) and sh.mesh == self.mesh else jax.device_put(a, self.replicated)
        return jax.tree.map(place, tree)

    def table_sharding(self, name: str) -> NamedSharding:
        return sharding_for(self.layouts[name].table.placement, self.mesh, 2)

    def _init_table(self, lay: TableLayout) -> State:
        """Zeros, or N(0, init_scale^2) rows drawn from (table seed, row) by the same
        function the parameter servers use: the table starts identical on any mesh and
        when it moves to a HostTable("hashed")."""
        t = lay.table
        shape = (lay.rows_per_shard * lay.shards, t.dim)
        sharding = self.table_sharding(t.name)
        if t.init_scale:
            def shard_rows(index):
                rows = np.arange(*index[0].indices(shape[0]), dtype=np.uint64)
                return init_rows(rows, t.dim, t.init_scale, t.seed)
            params = jax.make_array_from_callback(shape, sharding, shard_rows)
        else:
            params = jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)()

        def slots():
            return {s: jnp.full(shape, t.optimizer.slot_init(s), jnp.float32) for s in t.optimizer.slots}

        return {"params": params,
                "slots": jax.jit(slots, out_shardings={s: sharding for s in t.optimizer.slots})()}

    # ---------------------------------------------------------------- host side
    def plan_batch(self, batch: Batch) -> dict[str, Any]:
        """Hash ids to rows and plan every table's lookup (host work, no device step).

        With several processes the plan must cover the global batch (every owner shard
        serves all of them): each process gathers every process's ids and mask, plans the
        whole batch identically, and keeps the inverse rows of its own examples. The
        gather is a collective, so callers issue it from one thread, in step order."""
        multi = jax.process_count() > 1
        mask = self._global_rows(batch.mask) if multi else batch.mask
        gathered: dict[str, np.ndarray] = {}  # tables reading the same feature share one gather
        plans = {}
        lo = self._process_rows(batch.size)[1] * batch.size if multi else 0
        for name, lay in self.layouts.items():
            keys = getattr(batch, lay.table.feature)
            if multi:
                if lay.table.feature not in gathered:
                    gathered[lay.table.feature] = self._global_rows(keys)
                keys = gathered[lay.table.feature]
            if lay.blocked:
                vals = self._global_rows(batch.vals) if multi else batch.vals
                plan = split_by_block(keys, vals, mask, lay.rows_per_shard, lay.shards, self.routers[name],
                                      self.block_widths.get(name))
                self.block_widths[name] = plan.width
                if multi:
                    plan.inverse = plan.inverse[:, lo:lo + batch.size]
                    plan.vals = plan.vals[:, lo:lo + batch.size]
            else:
                plan = self.routers[name].plan(keys, mask)
                if multi:
                    plan.inverse = plan.inverse[lo:lo + batch.size]
            plans[name] = plan
        if self.host is not None:
            share = None
            if multi:  # every process dedups the whole batch, each pulls and pushes its keys
                def ids(feature: str) -> np.ndarray:
                    if feature not in gathered:
                        gathered[feature] = self._global_rows(getattr(batch, feature))
                    return gathered[feature]
                share = ProcessShare(self._process_rows(batch.size)[1], jax.process_count(),
                                     self._local_data_shards(batch.size), mask, ids, lo)
            plans.update(self.host.plan(batch, share))
        return plans

    def _process_rows(self, local_rows: int) -> tuple[list[int], int]:
        """Processes in the order of their rows of the global batch, and this process's
        place in it (from the batch sharding: no assumption on device order)."""
        if local_rows in self._process_order_cache:
            return self._process_order_cache[local_rows]
        n = jax.process_count()
        index = self.batch_sharding.devices_indices_map((local_rows * n,))
        starts: dict[int, set[int]] = {}
        for dev, idx in index.items():
            starts.setdefault(dev.process_index, set()).add(idx[0].start or 0)
        first = {p: min(s) for p, s in starts.items()}
        for p, s in starts.items():  # each process must own one contiguous block of rows
            if max(s) - first[p] >= local_rows:
                raise ValueError("the data axis does not give each process a contiguous block of the batch")
        order = sorted(first, key=first.get)
        self._process_order_cache[local_rows] = (order, order.index(jax.process_index()))
        return self._process_order_cache[local_rows]

    def _global_rows(self, x: np.ndarray) -> np.ndarray:
        """Every process's rows of `x`, concatenated in global batch order."""
        order, _ = self._process_rows(x.shape[0])
        stacked = allgather_host(x)
        return stacked[order].reshape((-1,) + x.shape[1:])

    def to_device(self, batch: Batch, plans: dict[str, Any],
                  host_rows: dict[str, np.ndarray] | None = None) -> State:
        """Place one process-local batch, its plans and its pulled host rows on the mesh."""
        local_shards = self._local_data_shards(batch.size)
        if batch.size % local_shards:
            raise ValueError(f"a batch of {batch.size} rows does not split evenly over this process's "
                             f"{local_shards} 'data' shards; choose a batch size divisible by it")
        host: dict[str, Any] = {"labels": batch.labels, "weights": batch.weights,
                                "vals": batch.vals, "mask": batch.mask}
        if batch.dense is not None:
            host["dense"] = batch.dense
        host["plans"] = {name: _plan_arrays(plans[name]) for name in self.layouts}
        shardings = {k: self.batch_sharding for k in host if k != "plans"}
        shardings["plans"] = {name: self._plan_shardings(name) for name in self.layouts}
        for name in (self.host.tables if self.host is not None else ()):
            host["plans"][name] = {"inverse": plans[name].inverse}
            shardings["plans"][name] = {"inverse": self.batch_sharding}
            if host_rows is not None:  # the pulled unique rows
                host["plans"][name]["rows"] = host_rows[name]
                shardings["plans"][name]["rows"] = self.replicated
        if jax.process_count() == 1:  # one call for the whole batch: ~4x less overhead
            return jax.device_put(host, shardings)
        # this process holds its rows of the global batch, and the whole (identical) plans
        put = lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x)  # noqa: E731
        dev = {k: put(v) for k, v in host.items() if k != "plans"}
        dev["plans"] = {}
        for name in self.layouts:
            arrays, sh = _plan_arrays(plans[name]), self._plan_shardings(name)
            dev["plans"][name] = {k: _replicated_input(a, sh[k]) if k == "owner_rows" else
                                  jax.make_array_from_process_local_data(sh[k], a) for k, a in arrays.items()}
        for name in (self.host.tables if self.host is not None else ()):
            dev["plans"][name] = {"inverse": put(plans[name].inverse)}
        return dev if host_rows is None else self.put_host_rows(dev, host_rows)

    def _plan_shardings(self, name: str) -> dict[str, NamedSharding]:
        """owner_rows split like the table; the per-example arrays over `data` (a Blocked
        table's [blocks, B, W] also over its axis: device b gets block b of each example)."""
        lay = self.layouts[name]
        per_example = NamedSharding(self.mesh, P(lay.axis, "data")) if lay.blocked else self.batch_sharding
        out = {"owner_rows": self.table_sharding(name), "inverse": per_example}
        if lay.blocked:
            out["vals"] = per_example
        return out

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one StepBuilder per trainer; keyed by batch size
    def _local_data_shards(self, local_rows: int) -> int:
        """How many distinct batch slices this process's devices hold (computed once per size)."""
        n = local_rows * jax.process_count()
        return len({idx[0].indices(n) for idx in self.batch_sharding.addressable_devices_indices_map((n,)).values()})

    def put_host_rows(self, dev: State, host_rows: dict[str, np.ndarray]) -> State:
        """Add the (repaired) pulled rows of the host tables to a placed batch."""
        if jax.process_count() == 1:
            rows = jax.device_put(host_rows, {name: self.replicated for name in host_rows})
        else:  # each process holds its block of a [processes * C, dim] array (ProcessShare)
            rows = {name: jax.make_array_from_process_local_data(
                        self.batch_sharding, r, (r.shape[0] * jax.process_count(),) + r.shape[1:])
                    for name, r in host_rows.items()}
        plans = dict(dev["plans"])
        for name, r in rows.items():
            plans[name] = dict(plans.get(name, {}), rows=r)
        return dict(dev, plans=plans)

    def set_dense(self, state: State, rows: np.ndarray) -> State:
        """Worker groups: the dense parameters from the PS table's rows (e.g. at the end)."""
        dense = jax.jit(self.dense_table.unflatten)(_replicated_input(rows, self.replicated))
        dense = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), dense, state["dense"])
        return dict(state, dense=dense)

    # ---------------------------------------------------------------- device side
    def _forward(self, dense, unique, batch):
        module, emb = self._inputs(dense, unique, batch)
        return self.model.logits(module, emb, batch)

    def _summed_loss(self, dense, unique, batch) -> jax.Array:
        """Weighted logloss summed over the batch; the model's own `summed_loss` when it has
        one (a pipelined tower computes it on its last stage), else from its logits."""
        module, emb = self._inputs(dense, unique, batch)
        if hasattr(self.model, "summed_loss"):
            return self.model.summed_loss(module, emb, batch, logloss_terms)
        return jnp.sum(batch["weights"] * logloss_terms(self.model.logits(module, emb, batch), batch["labels"]))

    def loss_and_grads(self, dense, unique, batch) -> tuple[jax.Array, tuple[Any, Any]]:
        """(mean loss, (dense gradients, unique-row gradients)) of one batch: the step's
        differentiation, callable on its own (tests compare placements with it)."""

        def loss_fn(dense, unique):
            total = self._summed_loss(dense, unique, batch)
            mean = total / jnp.maximum(jnp.sum(batch["weights"]), 1.0)
            return (total if self.loss_reduction == "sum" else mean), mean

        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):  # for staged (pipelined) parts
            (_, loss), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(dense, unique)
        return loss, grads

    def _inputs(self, dense, unique, batch):
        """The dense module and each table's rows per example, as the model reads them."""
        emb = {}
        mask = batch["mask"].astype(jnp.float32)[..., None]
        for name, u in unique.items():
            plan = batch["plans"][name]
            lay = self.layouts.get(name)
            if lay is not None and lay.blocked:  # [B, dim], summed over the blocks
                emb[name] = blocked_pool(u, plan["inverse"], plan["vals"], self.mesh, lay.axis)
                continue
            flat = u.reshape(-1, u.shape[-1])
            emb[name] = jnp.take(flat, plan["inverse"], axis=0) * mask
        return nnx.merge(self.graphdef, dense), emb

    def _gather(self, state, batch):
        """Each table's unique rows: gathered per shard, or pulled from the PS by the host."""
        unique = {name: gather_unique(state["tables"][name]["params"], batch["plans"][name]["owner_rows"],
                                      self.mesh, lay.axis)
                  for name, lay in self.layouts.items()}
        for name in (self.host.tables if self.host is not None else ()):
            unique[name] = batch["plans"][name]["rows"]
        return unique

    def _train_step(self, state: State, batch: State) -> tuple[State, dict]:
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):  # for staged (pipelined) parts
            return self._train_step_body(state, batch)

    def _train_step_body(self, state: State, batch: State) -> tuple[State, dict]:
        unique = self._gather(state, batch)
        if self.dense_table is not None:  # worker groups: this step's dense parameters from the PS
            current = self.dense_table.unflatten(batch["plans"][DENSE_TABLE]["rows"])
        else:
            current = state["dense"]
        loss, (g_dense, g_unique) = self.loss_and_grads(current, unique, batch)
        step = state["step"] + 1
        if self.dense_table is not None:  # the servers apply it
            dense, dense_opt = current, state["dense_opt"]
        else:
            updates, dense_opt = self.dense_tx.update(g_dense, state["dense_opt"], state["dense"])
            dense = optax.apply_updates(state["dense"], updates)
        tables = {}
        for name, lay in self.layouts.items():
            ts = state["tables"][name]
            params, slots = apply_rows(lay.table.optimizer, ts["params"], ts["slots"],
                                       batch["plans"][name]["owner_rows"], g_unique[name],
                                       step, self.mesh, lay.axis)
            tables[name] = {"params": params, "slots": slots}
        new_state = {"step": step, "dense": dense, "dense_opt": dense_opt, "tables": tables}
        metrics = {"loss": loss, "examples": jnp.sum(batch["weights"])}
        if self.host is not None:  # the servers apply these: summed gradient per unique row
            metrics["host_grads"] = {name: g_unique[name] * self.grad_scale for name in self.host.tables}
            if self.dense_table is not None:
                block_rows = batch["plans"][DENSE_TABLE]["rows"].shape[0]  # every process's block
                metrics["host_grads"][DENSE_TABLE] = self.dense_table.flatten(g_dense, block_rows) * self.grad_scale
        return new_state, metrics

    def _eval_step(self, state: State, batch: State) -> jax.Array:
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            logits = self._forward(state["dense"], self._gather(state, batch), batch)
        return jax.nn.sigmoid(logits)


def _plan_arrays(plan: Any) -> dict[str, np.ndarray]:
    """The arrays of a table's lookup plan that the device step reads."""
    if isinstance(plan, BlockedBatch):
        return {"owner_rows": plan.rows, "inverse": plan.inverse, "vals": plan.vals}
    return {"owner_rows": plan.owner_rows, "inverse": plan.inverse}


def _replicated_input(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array every process holds in full on the host (a plan), placed per sharding."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def dense_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """optax transform for dense namespaces by name."""
    makers: dict[str, Callable[[float], optax.GradientTransformation]] = {
        "sgd": optax.sgd, "adagrad": optax.adagrad, "adam": optax.adam, "adamw": optax.adamw,
    }
    if name not in makers:
        raise ValueError(f"unknown dense optimizer {name!r}; choose one of {sorted(makers)}")
    return makers[name](learning_rate)
