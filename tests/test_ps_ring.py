"""Consistent-hash ring: balanced, deterministic, and a membership change moves ~1/n."""
import numpy as np
import pytest

from jaxps.ps.ring import Ring, partition_of


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


def test_ring_rejects_bad_membership():
    with pytest.raises(ValueError, match="duplicate"):
        Ring(16, 4, ["a", "a"])
