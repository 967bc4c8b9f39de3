"""The fused HostTable plan kernels (jaxps.tables.host_plan) and HostTables.plan equal a
numpy plan built from np.unique: keys in first-seen order, the inverse, each process's
share of a multi-process step (its keys and block rows), for hashed and raw 64-bit ids,
masked, empty and duplicate-heavy batches, and batches that outgrow the index."""
import numpy as np
import pytest

from jaxps.data.batch import Batch
from jaxps.hashing import mix64
from jaxps.host_tables import HostTables, ProcessShare
from jaxps.placement import HostTable
from jaxps.ps.client import embedded
from jaxps.tables.host_plan import dedup_ids
from jaxps.tables.routing import grown_capacity
from jaxps.tables.table import Table


def numpy_plan(keys: np.ndarray, mask: np.ndarray, owners: int = 1):
    """(unique keys in first-seen order, inverse (0 where masked), owner, rank among the
    owner's keys) from np.unique."""
    flat, m = keys.reshape(-1).astype(np.uint64), mask.reshape(-1)
    u, first, inv = np.unique(flat[m], return_index=True, return_inverse=True)
    order = np.argsort(first)                 # first-seen order
    place = np.empty_like(order)
    place[order] = np.arange(order.size)
    uniq = u[order]
    inverse = np.zeros(flat.shape[0], np.int64)
    inverse[m] = place[inv.reshape(-1)]
    owner = (mix64(uniq) % np.uint64(owners)).astype(np.int64) if uniq.size else np.zeros(0, np.int64)
    rank = np.zeros(uniq.size, np.int64)
    for o in range(owners):
        sel = np.flatnonzero(owner == o)
        rank[sel] = np.arange(sel.size)
    return uniq, inverse, owner, rank


def zipf_ids(rng, shape, vocab):
    return (rng.zipf(1.3, size=shape) % vocab).astype(np.uint64)


CASES = {
    "zipf": lambda rng: (zipf_ids(rng, (256, 13), 5000), rng.random((256, 13)) < 0.9),
    "all_unique_full_range": lambda rng: (rng.integers(0, 2**64, (300, 7), dtype=np.uint64),
                                          np.ones((300, 7), bool)),  # outgrows the n/2 index
    "one_id": lambda rng: (np.full((64, 5), 2**64 - 1, np.uint64), np.ones((64, 5), bool)),
    "all_masked": lambda rng: (zipf_ids(rng, (32, 4), 100), np.zeros((32, 4), bool)),
    "empty": lambda rng: (np.zeros((0, 4), np.uint64), np.zeros((0, 4), bool)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("owners", [1, 3])
def test_dedup_ids_equals_numpy(case, hashed, owners):
    ids, mask = CASES[case](np.random.default_rng(7))
    t = Table("t", rows=1000, seed=5)  # 1000 rows: not a power of two (the division path)
    keys = t.rows_for(ids).astype(np.uint64) if hashed else ids
    d = dedup_ids(ids, mask, t.rows if hashed else None, t.salt, owners)
    uniq, inverse, owner, rank = numpy_plan(keys, mask, owners)
    np.testing.assert_array_equal(d.index.keys(), uniq)
    np.testing.assert_array_equal(d.slots, inverse)
    assert d.slots.dtype == np.int32
    if owners > 1:
        np.testing.assert_array_equal(d.owner_of[:d.unique], owner)
        np.testing.assert_array_equal(d.rank_of[:d.unique], rank)
        np.testing.assert_array_equal(d.counts, np.bincount(owner, minlength=owners))
    # the index answers the strict repair's probe
    np.testing.assert_array_equal(d.index.find(uniq), np.arange(uniq.size))


def test_power_of_two_rows_hash_like_rows_for():
    """A power-of-two row count takes the mask path in the kernel: same rows as numpy's %."""
    ids = np.random.default_rng(1).integers(0, 2**64, 5000, dtype=np.uint64)
    t = Table("t", rows=1 << 12, seed=9)
    d = dedup_ids(ids, np.ones(ids.shape, bool), t.rows, t.salt)
    uniq, inverse, _, _ = numpy_plan(t.rows_for(ids).astype(np.uint64), np.ones(ids.shape, bool))
    np.testing.assert_array_equal(d.index.keys(), uniq)
    np.testing.assert_array_equal(d.slots, inverse)


def _batch(ids, mask):
    n = ids.shape[0]
    return Batch(labels=np.zeros(n, np.float32), ids=ids, vals=np.ones(ids.shape, np.float32), mask=mask,
                 weights=np.ones(n, np.float32))


@pytest.mark.parametrize("kind", ["hashed", "collisionless"])
def test_host_tables_plan_equals_numpy(kind):
    rng = np.random.default_rng(3)
    ids, mask = zipf_ids(rng, (128, 6), 900), rng.random((128, 6)) < 0.8
    t = Table("e", rows=512, dim=4, placement=HostTable(kind), seed=2)
    host = HostTables([t], embedded([]))
    plan = host.plan(_batch(ids, mask))["e"]
    keys = t.rows_for(ids).astype(np.uint64) if kind == "hashed" else ids
    uniq, inverse, _, _ = numpy_plan(keys, mask)
    np.testing.assert_array_equal(plan.keys, uniq)
    np.testing.assert_array_equal(plan.inverse, inverse.reshape(ids.shape))
    assert plan.capacity >= uniq.size and plan.capacity % 128 == 0
    shared = np.zeros(uniq.size, bool)
    assert plan.mark_shared(uniq[::-3], shared)  # the plan's own index serves the repair's probe
    np.testing.assert_array_equal(np.flatnonzero(shared), np.arange(uniq.size)[::-3][::-1])


@pytest.mark.parametrize("count,local_shards", [(2, 1), (3, 2)])
def test_process_shares_equal_numpy_and_cover_the_batch(count, local_shards):
    """Each process's plan of a multi-process step: its keys (owned by hash), the block
    rows of its own examples, and a capacity every process agrees on; together the shares
    hold every unique key once, and each occurrence's block row holds its key."""
    rng = np.random.default_rng(11)
    rows = 40                                           # examples per process
    ids, mask = zipf_ids(rng, (rows * count, 5), 700), rng.random((rows * count, 5)) < 0.85
    t = Table("e", rows=256, dim=4, placement=HostTable("hashed"), seed=4)
    keys = t.rows_for(ids).astype(np.uint64)
    uniq, inverse, owner, rank = numpy_plan(keys, mask, count)
    cap = -(-grown_capacity(int(np.bincount(owner, minlength=count).max())) // local_shards) * local_shards
    block_keys = np.zeros(count * cap, np.uint64)
    seen = []
    for r in range(count):
        host = HostTables([t], embedded([]))
        share = ProcessShare(r, count, local_shards, mask, lambda f: ids, r * rows)
        plan = host.plan(_batch(ids[r * rows:(r + 1) * rows], mask[r * rows:(r + 1) * rows]), share)["e"]
        assert plan.capacity == cap
        np.testing.assert_array_equal(plan.keys, uniq[owner == r])
        want = np.where(mask.reshape(-1), owner[inverse] * cap + rank[inverse], 0).reshape(mask.shape)
        np.testing.assert_array_equal(plan.inverse, want[r * rows:(r + 1) * rows])
        block_keys[r * cap:r * cap + plan.keys.size] = plan.keys
        seen.append(plan.keys)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(uniq))
    local = [HostTables([t], embedded([])).plan(
        _batch(ids[r * rows:(r + 1) * rows], mask[r * rows:(r + 1) * rows]),
        ProcessShare(r, count, local_shards, mask, lambda f: ids, r * rows))["e"].inverse for r in range(count)]
    whole = np.concatenate(local).reshape(-1)
    m = mask.reshape(-1)
    np.testing.assert_array_equal(block_keys[whole[m]], keys.reshape(-1)[m])
