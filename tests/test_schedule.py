"""Pipeline schedule tables: complete, in dependency order, bounded stash, bubble = theory."""
import itertools

import pytest

from jaxps.parallel.schedule import build

CASES = [("gpipe", s, m, 1) for s, m in itertools.product((2, 4), (4, 8))] + \
        [("1f1b", s, m, 1) for s, m in itertools.product((2, 3, 4), (1, 4, 8, 16))] + \
        [("interleaved", s, m, v) for s, m, v in itertools.product((2, 4), (4, 8), (2, 3))]


@pytest.mark.parametrize("kind,S,M,V", CASES)
def test_every_op_once_in_dependency_order(kind, S, M, V):
    sched = build(kind, S, M, V)
    when = {}
    for t, row in enumerate(sched.table):
        for s, op in enumerate(row):
            if op is not None:
                key = (op.kind, op.microbatch, sched.global_stage(s, op.chunk))
                assert key not in when, f"{key} runs twice"
                when[key] = t
    G = S * V
    assert len(when) == 2 * M * G  # every (microbatch, global stage): one F and one B
    for m in range(M):
        for g in range(G):
            if g:
                assert when[("F", m, g - 1)] < when[("F", m, g)]
            assert when[("F", m, g)] < when[("B", m, g)]
            if g < G - 1:
                assert when[("B", m, g + 1)] < when[("B", m, g)]


@pytest.mark.parametrize("S,M", [(2, 8), (4, 8), (4, 16), (3, 5)])
def test_1f1b_stash_is_bounded_by_stages_and_gpipe_is_not(S, M):
    assert max(build("1f1b", S, M).max_stash()) <= S
    assert build("gpipe", S, M).max_stash()[0] == M


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_bubble_equals_theory(kind):
    for S, M in itertools.product((2, 4), (4, 8, 16)):
        sched = build(kind, S, M)
        assert sched.bubble_fraction() == pytest.approx(sched.theory_bubble())
        assert sched.ticks == 2 * (M + S - 1)


def test_interleaving_shrinks_the_bubble():
    plain = build("1f1b", 4, 8)
    inter = build("interleaved", 4, 8, 2)
    assert inter.bubble_fraction() < plain.bubble_fraction()
    assert inter.bubble_fraction() <= 1.1 * inter.theory_bubble() + 1e-9


def test_bad_requests():
    with pytest.raises(ValueError, match="divisible"):
        build("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        build("zero-bubble", 2, 2)


def test_cli_prints_table_and_draws_png(tmp_path):
    from jaxps.cli import main
    out = tmp_path / "s.png"
    assert main(["schedule", "--kind", "1f1b", "--stages", "4", "--microbatches", "8", "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind,S,M,V", [("gpipe", 4, 16, 1), ("1f1b", 4, 16, 1), ("1f1b", 2, 6, 1),
                                        ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 3)])
def test_buffer_slots_bound_the_pipeline_buffers(kind, S, M, V):
    """The executor sizes its activation and gradient buffers by `buffer_slots` (entry m in
    slot m % slots): 1F1B keeps at most S stage inputs, GPipe all M; a gradient is used
    the tick after it arrives in these tables, so one or two slots hold them."""
    acts, grads = build(kind, S, M, V).buffer_slots()
    assert acts <= {"gpipe": M, "1f1b": S, "interleaved": 2 * S * V}[kind]
    assert grads <= 2
    if kind == "gpipe":
        assert acts == M
