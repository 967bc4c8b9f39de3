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
    """The executor sizes its buffers by `buffer_slots` (entry m in slot m % slots): the
    stash (forward to backward) holds at most S entries under 1F1B and all M under GPipe;
    arrivals and gradients are used a tick or two after they arrive in these tables; the
    last stage's own loss gradients (kept from its forward to its backward) are M under
    GPipe, one under 1F1B (its backward follows its forward at once)."""
    sched = build(kind, S, M, V)
    for loss_at_forward in (False, True):
        slots = sched.buffer_slots(loss_at_forward)
        assert sched.buffer_slots(loss_at_forward, input_until_backward=True).arrivals == slots.stash
        assert slots.stash <= {"gpipe": M, "1f1b": S, "interleaved": 2 * S * V}[kind]
        assert slots.stash <= max(sched.max_stash())
        assert slots.arrivals <= 2 and slots.grads <= 2
        if kind == "gpipe":
            assert slots.stash == M
        if kind == "1f1b":
            assert slots.loss_grads == 1
        if kind == "gpipe" and loss_at_forward:
            assert slots.loss_grads == M
    assert sched.buffer_slots(False).loss_grads == 1  # nothing kept: the backward makes it


def test_buffer_slots_never_collide():
    """Replaying a table with every buffer as a ring of `buffer_slots` slots: no entry is
    overwritten before it is consumed (an independent check of the spans)."""
    for (kind, S, M, V), until_bwd in itertools.product(
            [("gpipe", 4, 16, 1), ("1f1b", 4, 16, 1), ("1f1b", 3, 7, 1), ("interleaved", 4, 8, 2),
             ("interleaved", 2, 4, 3)], (False, True)):
        sched = build(kind, S, M, V)
        G = S * V
        slots = sched.buffer_slots(True, input_until_backward=until_bwd)
        rings = {name: {} for name in ("arrivals", "grads", "stash", "loss_grads")}

        def put(name, g, m):
            key = (g, m % getattr(slots, name))
            assert key not in rings[name], (kind, name, g, m, rings[name][key])
            rings[name][key] = m

        def take(name, g, m):
            assert rings[name].pop((g, m % getattr(slots, name))) == m

        for row in sched.table:
            for s, op in enumerate(row):
                if op is None:
                    continue
                g = sched.global_stage(s, op.chunk)
                if op.kind == "F" and g > 0 and not until_bwd:
                    take("arrivals", g, op.microbatch)
                elif op.kind == "B":
                    if g > 0 and until_bwd:
                        take("arrivals", g, op.microbatch)
                    take("stash", g, op.microbatch)
                    take("loss_grads" if g == G - 1 else "grads", g, op.microbatch)
            for s, op in enumerate(row):
                if op is None:
                    continue
                g = sched.global_stage(s, op.chunk)
                if op.kind == "F":
                    put("stash", g, op.microbatch)
                    put("arrivals" if g < G - 1 else "loss_grads", g + (g < G - 1), op.microbatch)
                elif g > 0:
                    put("grads", g - 1, op.microbatch)
        assert not any(rings.values())


@pytest.mark.parametrize("S,M", [(4, 16), (3, 5)])
def test_lockstep_bubble(S, M):
    """With equal op costs the lockstep bubble is the table's idle-cell fraction; with a
    costlier backward GPipe's still equals theory and 1F1B's exceeds it (a forward waits
    for a neighbour's backward in the same tick). Closed form for GPipe: (S-1)/(M+S-1)."""
    gpipe, f1b1 = build("gpipe", S, M), build("1f1b", S, M)
    for sched in (gpipe, f1b1, build("interleaved", 2, 4, 2)):
        assert sched.lockstep_bubble(1.0) == pytest.approx(sched.bubble_fraction())
    assert gpipe.lockstep_bubble(2.0) == pytest.approx((S - 1) / (M + S - 1))
    assert f1b1.lockstep_bubble(2.0) > f1b1.theory_bubble() + 0.01
