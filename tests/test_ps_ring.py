"""Consistent-hash ring: balanced, deterministic, and a membership change moves ~1/n."""
import numpy as np
import pytest

from jaxps.ps.ring import Ring, partition_of, partition_runs, partition_runs_keys
from reference import ring_move_spread


def test_partitions_spread_keys_and_are_stable():
    keys = np.random.default_rng(0).integers(0, 2**63, 200_000, dtype=np.uint64)
    p = partition_of(keys, 1024)
    assert p.min() >= 0 and p.max() < 1024
    counts = np.bincount(p, minlength=1024)
    assert counts.std() / counts.mean() < 0.15
    np.testing.assert_array_equal(p, partition_of(keys, 1024))
    # keys that collide under a naive modulo land in different partitions
    naive = np.arange(10, dtype=np.uint64) * np.uint64(1024)
    assert len(set(partition_of(naive, 1024).tolist())) > 5


def test_ring_balance_and_determinism():
    servers = [f"ps-{i}" for i in range(8)]
    ring = Ring(1024, 64, servers)
    counts = np.bincount(ring.owners(), minlength=8)
    assert counts.min() > 1024 / 8 * 0.6 and counts.max() < 1024 / 8 * 1.5
    np.testing.assert_array_equal(ring.owners(), Ring(1024, 64, servers).owners())


@pytest.mark.parametrize("n", [3, 4, 8])
def test_join_and_leave_move_about_one_nth(n):
    servers = [f"ps-{i}" for i in range(n)]
    ring = Ring(1024, 64, servers)
    joined = ring.with_servers(servers + ["ps-new"])
    moved = joined.moves(ring)
    # only partitions taken by the new server move, about 1/(n+1) of them
    assert set(np.array(joined.owner_names())[moved]) == {"ps-new"}
    assert abs(len(moved) / 1024 - 1 / (n + 1)) < 0.5 / (n + 1)
    left = ring.with_servers(servers[1:])
    moved = left.moves(ring)
    # only the leaver's partitions move; everyone else keeps theirs
    assert set(np.array(ring.owner_names())[moved]) == {"ps-0"}
    assert len(moved) == int((ring.owners() == 0).sum())
    assert joined.version == ring.version + 1


@pytest.mark.parametrize("vnodes", [64, 256])
def test_join_copies_spread_as_derived(vnodes):
    """`Ring.gains` of a join over 40 sets of server names (5 servers after it, one backup):
    only the joiner gains, in exactly the partitions whose new replica set holds it; the
    copied fraction of (partition, replica) pairs has mean 1/n and the spread
    `reference.ring_move_spread` derives (to within the sampling error of 40 draws), every
    draw within 3.5 sigma (the largest of 40 normal draws passes that with chance ~2%;
    one draw passes 3 sigma with chance 0.3%: the band of a single change). (More vnodes shrink only its geometric half: with 256
    partitions, the binomial half dominates.)"""
    n, k, parts = 5, 1, 256
    sigma = ring_move_spread(n, k + 1, vnodes, parts)
    scaled = []
    for seed in range(40):
        names = [f"s{seed}-{i}" for i in range(n - 1)]
        before = Ring(parts, vnodes, names)
        after = before.with_servers(names + [f"s{seed}-new"])
        gains = before.gains(after, k)
        holds = {p for p in range(parts) if n - 1 in after.replicas(k)[p]}
        assert set(gains) == holds and all(g == [f"s{seed}-new"] for g in gains.values())
        scaled.append(len(gains) / (parts * (k + 1)) * n)
    scaled = np.array(scaled)
    assert np.all(np.abs(scaled - 1) < 3.5 * sigma), (scaled.min(), scaled.max(), sigma)
    assert abs(scaled.mean() - 1) < 3 * sigma / np.sqrt(len(scaled))
    assert 0.6 * sigma < scaled.std() < 1.4 * sigma, (scaled.std(), sigma)


def test_ring_rejects_bad_membership():
    with pytest.raises(ValueError, match="duplicate"):
        Ring(16, 4, ["a", "a"])


@pytest.mark.parametrize("num_partitions", [1, 7, 256, 1024])
def test_partition_runs_equal_numpy_stable_sort(num_partitions):
    """The numba counting sort groups keys exactly as a stable sort by `partition_of`."""
    rng = np.random.default_rng(num_partitions)
    keys = np.concatenate([rng.integers(0, 2**64 - 1, 5000, dtype=np.uint64, endpoint=True),
                           np.array([0, 1, 2**63, 2**64 - 1], np.uint64), np.zeros(0, np.uint64)])
    for k in (keys, keys[:0], keys[:1]):
        order, parts, bounds = partition_runs(k, num_partitions)
        p = partition_of(k, num_partitions)
        want = np.argsort(p, kind="stable")
        np.testing.assert_array_equal(order, want)
        np.testing.assert_array_equal(parts, np.unique(p))
        np.testing.assert_array_equal(np.diff(bounds), np.bincount(p, minlength=num_partitions)[np.unique(p)])
        assert bounds[0] == 0 and bounds[-1] == k.shape[0]
        *same, ordered = partition_runs_keys(k, num_partitions)
        for a, b in zip(same, (order, parts, bounds)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ordered, k[want])
