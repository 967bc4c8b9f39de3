"""Collisionless key index over the full uint64 range."""
import numpy as np

from jaxps.ps.keyindex import KeyIndex, dedup


def test_full_range_keys_including_modulo_collisions():
    rng = np.random.default_rng(0)
    keys = np.concatenate([
        rng.integers(0, 2**64 - 1, 5000, dtype=np.uint64, endpoint=True),
        np.array([0, 1, 2**63, 2**64 - 1, 2**63 - 1], np.uint64),
        np.arange(20, dtype=np.uint64) * np.uint64(2**20),  # equal under any modulo 2^k, k <= 20
        (np.arange(20, dtype=np.uint64) << np.uint64(40)),
    ])
    keys = np.unique(keys)
    rng.shuffle(keys)
    index = KeyIndex(capacity=4)  # forces several grows
    slots, new = index.find_or_insert(keys)
    assert new.all() and index.size == keys.size
    np.testing.assert_array_equal(np.sort(slots), np.arange(keys.size))
    np.testing.assert_array_equal(index.find(keys), slots)
    np.testing.assert_array_equal(index.keys()[slots], keys)
    again, new2 = index.find_or_insert(keys[::-1])
    assert not new2.any()
    np.testing.assert_array_equal(again, slots[::-1])
    absent = np.array([12345678901234567890, 3], np.uint64)
    absent = absent[~np.isin(absent, keys)]
    assert (index.find(absent) == -1).all()


def test_repeated_keys_in_one_call_share_a_slot():
    index = KeyIndex()
    slots, new = index.find_or_insert(np.array([7, 9, 7, 7, 2**64 - 1, 9], np.uint64))
    np.testing.assert_array_equal(slots, [0, 1, 0, 0, 2, 1])
    np.testing.assert_array_equal(new, [True, True, False, False, True, False])


def test_dedup_matches_numpy_unique():
    keys = np.random.default_rng(1).zipf(1.3, (64, 20)).astype(np.uint64) * np.uint64(2**40)
    uniq, inv = dedup(keys)
    np.testing.assert_array_equal(uniq[inv], keys)
    assert len(uniq) == len(np.unique(keys))


def test_huge_page_backed_arrays_are_zeroed_and_sized():
    """Index arrays from 1 MiB on come from `huge_zeros`: zeroed, exact length, writable;
    1-2 MiB of buckets are rounded up to a whole huge page of buckets (a power of two)."""
    from jaxps.memory import HUGE_MIN, HUGE_PAGE, huge_capacity, huge_zeros
    a = huge_zeros(HUGE_MIN // 8 + 3, np.uint64)
    assert a.shape == (HUGE_MIN // 8 + 3,) and not a.any() and a.flags.writeable
    a[-1] = 7
    assert a.ctypes.data % HUGE_PAGE == 0 or not hasattr(__import__("mmap"), "MADV_HUGEPAGE")
    assert huge_capacity(HUGE_MIN // 4, 4) == HUGE_PAGE // 4 and huge_capacity(1000, 4) == 1000
    from jaxps.ps.keyindex import KeyIndex
    index = KeyIndex(capacity=200_000)   # 2^18 uint32 buckets (1 MiB) -> 2^19 (2 MiB)
    assert index._buckets.nbytes == HUGE_PAGE and index._buckets.shape[0] == 1 << 19
    keys = np.arange(1, 300_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    slots, new = index.find_or_insert(keys)
    assert new.all() and np.array_equal(slots, np.arange(300_000))
    np.testing.assert_array_equal(index.find(keys), np.arange(300_000))
    np.testing.assert_array_equal(index.keys(), keys)
