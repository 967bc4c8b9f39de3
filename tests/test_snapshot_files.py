"""The files of a hot checkpoint: PS rows streamed piece by piece into plain .npy files
(never joined in memory), legacy `rows.npz` steps still readable, and the device state
written without compression -- each checked against numpy's own reading of the bytes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxps import snapshot
from jaxps.checkpoint import Checkpointer, state_uncompressed


def _pieces(rng, sizes, dim=3):
    return [{"keys": rng.integers(0, 1 << 63, n, dtype=np.uint64),
             "values": rng.standard_normal((n, dim)).astype(np.float32),
             "slot_accumulator": rng.random((n, dim), dtype=np.float32)} for n in sizes]


def _assert_rows_equal(got, want):
    assert sorted(got) == sorted(want)
    for field in want:
        assert got[field].dtype == want[field].dtype, field
        np.testing.assert_array_equal(got[field], want[field], err_msg=field)


def test_pieces_are_written_as_one_npy_file_per_field_equal_to_their_concatenation(tmp_path):
    """700 pieces (more than one writev call takes), some empty, of two tables: each field's
    file is what np.save would write of the concatenation, read back without pickle."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 40, 700)
    sizes[[0, 5, 699]] = 0
    pieces = {"embed": _pieces(rng, sizes), "wide": _pieces(rng, [7], dim=1)}
    snapshot.write_rows(str(tmp_path), pieces)
    for table, parts in pieces.items():
        want = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for field, a in want.items():
            np.save(tmp_path / "want.npy", a)
            assert (tmp_path / table / f"{field}.npy").read_bytes() == (tmp_path / "want.npy").read_bytes()
        _assert_rows_equal(snapshot.read_rows(str(tmp_path))[table], want)
    assert snapshot.joined(pieces)["embed"]["keys"].shape == (sizes.sum(),)


def test_short_writes_are_resumed(tmp_path, monkeypatch):
    """os.writev may write fewer bytes than asked: the rest still reaches the file."""
    writev = os.writev
    calls = []

    def short_writev(fd, bufs):  # at most 1000 bytes per call, cutting through buffers
        calls.append(len(bufs))
        budget, take = 1000, []
        for b in bufs:
            take.append(b[:budget])
            budget -= len(take[-1])
            if not budget:
                break
        return writev(fd, take)

    monkeypatch.setattr(os, "writev", short_writev)
    rng = np.random.default_rng(1)
    parts = _pieces(rng, [100, 3, 250])
    snapshot.write_rows(str(tmp_path), {"t": parts})
    assert len(calls) > 3
    _assert_rows_equal(snapshot.read_rows(str(tmp_path))["t"],
                       {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def test_a_step_written_as_rows_npz_still_restores(tmp_path):
    rows = {"embed": _pieces(np.random.default_rng(2), [11])[0]}
    # as steps were written before: one .npz of "<table>/<field>" arrays
    np.savez(tmp_path / snapshot.LEGACY_FILENAME, **{f"embed/{k}": a for k, a in rows["embed"].items()})
    _assert_rows_equal(snapshot.read_rows(str(tmp_path))["embed"], rows["embed"])


def test_an_empty_piece_list_is_refused_alike_and_an_empty_piece_round_trips(tmp_path):
    """`joined` and `write_rows` agree: a table of no pieces has no fields to join or write
    (written, it would restore as a table without keys), so both refuse it; a table
    without rows is one piece of zero rows, and joins and writes to the same arrays."""
    for call in (snapshot.joined, lambda rows: snapshot.write_rows(str(tmp_path / "none"), rows)):
        with pytest.raises(ValueError, match="no pieces"):
            call({"t": []})
    assert not (tmp_path / "none" / "t").exists()
    empty = _pieces(np.random.default_rng(4), [0])
    snapshot.write_rows(str(tmp_path / "empty"), {"t": empty})
    got = snapshot.read_rows(str(tmp_path / "empty"))["t"]
    _assert_rows_equal(got, snapshot.joined({"t": empty})["t"])
    assert got["values"].shape == (0, 3) and got["keys"].dtype == np.uint64


@pytest.mark.parametrize("name", ["a/b", "..", ""])
def test_table_names_that_are_not_file_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="file name"):
        snapshot.write_rows(str(tmp_path), {name: _pieces(np.random.default_rng(3), [2])[0]})


def test_the_device_state_is_written_uncompressed_and_restores(tmp_path):
    """A 4 MiB array of zeros takes 4 MiB on disk (zstd would make it a few KB): the save
    spends no CPU on compression. It restores bit for bit."""
    state = {"zeros": jnp.zeros((1 << 20,), jnp.float32), "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4)}
    ck = Checkpointer(str(tmp_path), asynchronous=False)
    ck.save(1, state)
    ck.wait()
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "1" / "state") for f in fs)
    got, _ = ck.restore(state, 1)
    np.testing.assert_array_equal(np.asarray(got["zeros"]), np.zeros(1 << 20, np.float32))
    np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert isinstance(got["w"], jax.Array)
    ck.close()
    if not state_uncompressed():
        pytest.skip("this Orbax has no PyTree handler inside StandardCheckpointHandler: state stays compressed")
    assert stored >= 4 << 20
