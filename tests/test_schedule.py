"""Pipeline schedule tables: complete, in dependency order, bounded stash, bubble = theory
(split backward: below it; zero-bubble: a third of it)."""
import itertools

import pytest

from jaxps.lm import LMConfig
from jaxps.parallel.schedule import DEFAULT, SPLIT, build
from jaxps.placement import parse

CASES = [("gpipe", s, m, 1) for s, m in itertools.product((2, 4), (4, 8))] + \
        [(k, s, m, 1) for k, s, m in itertools.product(("1f1b", "1f1b-paired"), (1, 2, 3, 4), (1, 4, 8, 16))] + \
        [(k, s, m, v) for k, s, m, v in itertools.product(("interleaved", "interleaved-paired"), (2, 4), (4, 8), (2, 3))] + \
        [("zb-h1", s, m, 1) for s, m in itertools.product((1, 2, 3, 4, 8), (1, 3, 4, 8, 16))] + \
        [(k, s, m, 1) for k, s, m in itertools.product(("gpipe-split", "1f1b-split"), (1, 2, 3, 4), (1, 3, 8))] + \
        [(k, s, m, v) for k, s, m, v in itertools.product(("interleaved-split", "interleaved-zb"), (2, 4), (4, 8), (2, 3))]


@pytest.mark.parametrize("kind,S,M,V", CASES)
def test_every_op_once_in_dependency_order(kind, S, M, V):
    sched = build(kind, S, M, V)
    when = {}  # op -> (tick, position in its cell): a cell's forward runs before its backward
    for t, row in enumerate(sched.table):
        for s, cell in enumerate(row):
            assert len(cell) <= 2 and [op.kind for op in cell] in (["F"], ["B"], ["F", "B"], ["W"], [])
            if len(cell) == 2:
                assert "paired" in kind
            if cell and cell[0].kind == "W":
                assert kind in SPLIT
            for i, op in enumerate(cell):
                key = (op.kind, op.microbatch, sched.global_stage(s, op.chunk))
                assert key not in when, f"{key} runs twice"
                when[key] = (t, i)
    G = S * V
    split = kind in SPLIT
    assert sched.split == split
    # every (microbatch, global stage): one F and one B (and, split, one W)
    assert len(when) == (3 if split else 2) * M * G
    for m in range(M):
        for g in range(G):
            if g:  # a forward needs the previous stage's forward from an earlier tick
                assert when[("F", m, g - 1)][0] < when[("F", m, g)][0]
            # a backward needs its own forward: earlier, or first in its cell
            assert when[("F", m, g)] < when[("B", m, g)]
            if g < G - 1:
                assert when[("B", m, g + 1)][0] < when[("B", m, g)][0]
            if split:  # the weight gradient needs its B (the output gradient it received)
                assert when[("B", m, g)][0] < when[("W", m, g)][0]


@pytest.mark.parametrize("S,M", [(2, 8), (4, 8), (4, 16), (3, 5)])
def test_1f1b_stash_is_bounded_by_stages_and_gpipe_is_not(S, M):
    assert max(build("1f1b", S, M).max_stash()) <= S
    assert build("gpipe", S, M).max_stash()[0] == M
    # paired 1F1B: stage s holds 2(S-1-s)+1 (the round trip in synchronous ticks; see schedule.py)
    assert build("1f1b-paired", S, M).max_stash() == [min(M, 2 * (S - 1 - s) + 1) for s in range(S)]


@pytest.mark.parametrize("S,M", [(2, 8), (4, 8), (4, 16), (8, 32)])
def test_default_schedule_keeps_1f1b_stash_bound_and_beats_its_lockstep_bubble(S, M):
    """The default a Staged tower runs (schedule.DEFAULT, see why there): 1F1B's bound on
    microbatches held per stage, and in synchronous ticks a bubble below the theory, where
    the textbook 1F1B table's is above it."""
    default, plain = build(DEFAULT, S, M), build("1f1b", S, M)
    assert max(default.max_stash()) <= S
    assert default.lockstep_bubble(2.0) < default.theory_bubble() < plain.lockstep_bubble(2.0)
    assert parse("staged:4").schedule == DEFAULT and LMConfig().schedule == DEFAULT


@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "1f1b-paired"])
def test_bubble_equals_theory(kind):
    for S, M in itertools.product((2, 4), (4, 8, 16)):
        sched = build(kind, S, M)
        assert sched.bubble_fraction() == pytest.approx(sched.theory_bubble())
        # a paired tick carries a forward and a backward: M + 2(S-1) ticks (schedule.py)
        assert sched.ticks == (M + 2 * (S - 1) if kind == "1f1b-paired" else 2 * (M + S - 1))


@pytest.mark.parametrize("S,M", [(2, 2), (2, 8), (3, 5), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32), (4, 2), (3, 1)])
def test_zero_bubble_h1_stash_and_lockstep_bubble(S, M):
    """ZB-H1: every stage holds at most S microbatches from F to W (1F1B's peak, there only
    on stage 0), and with B and W each costing a forward (a backward = 2 forwards) the
    lockstep bubble is the closed form (S-1)/(3M+S-1) for M >= S (module docstring): a third
    of 1F1B's theory bubble, under a fifth of 1F1B's lockstep one at M >= 4S. Fewer
    microbatches than stages still stay under the theory."""
    zb, f1b1 = build("zb-h1", S, M), build("1f1b", S, M)
    assert zb.max_stash() == [min(M, S)] * S
    assert max(zb.max_stash()) <= S
    assert zb.lockstep_bubble(2.0) == pytest.approx(zb.bubble_fraction())  # unit costs: idle cells
    assert zb.lockstep_bubble(2.0) <= 1.1 * zb.theory_bubble()
    if M >= S:
        assert zb.lockstep_bubble(2.0) == pytest.approx((S - 1) / (3 * M + S - 1))
        assert zb.ticks == 3 * M + S - 1
        assert zb.lockstep_bubble(2.0) <= 0.5 * f1b1.theory_bubble() + 1e-12
    if M >= 4 * S:
        assert zb.lockstep_bubble(2.0) < f1b1.lockstep_bubble(2.0) / 5


def test_zero_bubble_h1_buffer_slots():
    """The rings the executor sizes for ZB-H1: a stash entry, its input and its output
    gradient live until the W, so the stash holds S entries, kept inputs S, received output
    gradients S-1 (stage S-2: its B, then S-2 deferred W's), the last stage's own loss
    gradients S (its W lags its B by S-1)."""
    for S, M in [(4, 16), (2, 6), (3, 7), (8, 32), (4, 2), (1, 3)]:
        slots = build("zb-h1", S, M).buffer_slots(loss_at_forward=True, input_until_backward=True)
        assert slots == (min(M, S), max(1, min(M, S - 1)), min(M, S), min(M, S)), (S, M, slots)
        assert build("zb-h1", S, M).buffer_slots(True, False).arrivals == 1  # used by the next tick's F


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
    with pytest.raises(ValueError, match="divisible"):
        build("interleaved-paired", 4, 6, 2)
    for kind in ("gpipe-split", "1f1b-split", "zb-h1"):
        with pytest.raises(ValueError, match="no virtual stages"):
            build(kind, 2, 4, 2)
    with pytest.raises(ValueError, match="divisible"):
        build("interleaved-zb", 4, 6, 2)


def test_cli_prints_table_and_draws_png(tmp_path):
    from jaxps.cli import main
    out = tmp_path / "s.png"
    assert main(["schedule", "--kind", "1f1b", "--stages", "4", "--microbatches", "8", "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["schedule", "--kind", "1f1b-paired", "--stages", "4", "--microbatches", "8", "--png", str(out)]) == 0
    assert main(["schedule", "--kind", "zb-h1", "--stages", "4", "--microbatches", "8", "--png", str(out)]) == 0
    assert main(["schedule", "--kind", "interleaved-split", "--stages", "2", "--microbatches", "4", "--virtual", "2",
                 "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_shows_pairs():
    text = build("1f1b-paired", 2, 3).render()
    assert text.splitlines() == ["stage 0:    F0    F1 F2+B0    B1    B2",
                                 "stage 1:     . F0+B0 F1+B1 F2+B2     ."]


def test_render_shows_split_backward():
    """ZB-H1 at S=2: stage 1 runs W0 one microbatch late (after B1), which lets B1 reach
    stage 0 a tick earlier; stage 0 idles once, stage 1 once at the start: 3M + S-1 ticks."""
    assert build("zb-h1", 2, 3).render().splitlines() == ["stage 0: F0 F1  . B0 W0 F2 B1 W1 B2 W2",
                                                          "stage 1:  . F0 B0 F1 B1 W0 F2 B2 W1 W2"]


def test_render_shows_split_backward_at_once():
    """1F1B-split at S=2: each B is followed by its W; the last stage runs F, B, W of one
    microbatch in consecutive ticks, stage 0 idles S-1 ticks in the fill and S-1 waiting for
    its first B: 3M + 2(S-1) ticks."""
    assert build("1f1b-split", 2, 3).render().splitlines() == ["stage 0: F0 F1  . B0 W0 F2 B1 W1  . B2 W2",
                                                               "stage 1:  . F0 B0 W0 F1 B1 W1 F2 B2 W2  ."]


SPLIT_GRID = list(itertools.product((1, 2, 3, 4, 8), (1, 2, 4, 8, 16, 32), (1, 2, 3)))  # (S, M, V)


@pytest.mark.parametrize("kind", ["gpipe-split", "1f1b-split", "interleaved-split"])
def test_split_backward_lockstep_bubble_and_stash(kind):
    """Each backward as B then W (unit ops, one per cell): lockstep at unit costs equals the
    table's idle cells, 2(S-1)/(3VM + 2(S-1)) in closed form (schedule.py), at most 1.1x the
    theory (S-1)/(VM+S-1) -- below it for S > 1, since B sends the input gradient after one
    unit, not a backward's two -- where the unsplit table's lockstep bubble is 1.4-3x it.
    The stash is the base kind's on every stage (S-s for 1F1B, M for GPipe)."""
    base = SPLIT[kind][0]
    for S, M, V in SPLIT_GRID:
        if (V > 1) != (base == "interleaved") or (base == "interleaved" and M % S):
            continue
        sched, plain = build(kind, S, M, V), build(base, S, M, V)
        assert sched.ticks == 3 * V * M + 2 * (S - 1), (S, M, V)
        assert sched.lockstep_bubble(2.0) == pytest.approx(sched.bubble_fraction())
        assert sched.lockstep_bubble(2.0) == pytest.approx(2 * (S - 1) / (3 * V * M + 2 * (S - 1)))
        assert sched.lockstep_bubble(2.0) <= 1.1 * sched.theory_bubble()
        if S > 1 and M >= S:
            assert sched.lockstep_bubble(2.0) < 0.8 * sched.theory_bubble()
            if base != "gpipe" and M >= 2 * S:
                assert plain.lockstep_bubble(2.0) > 1.3 * plain.theory_bubble()
        assert sched.max_stash() == plain.max_stash(), (S, M, V)
        if base == "1f1b":
            assert sched.max_stash() == [min(M, S - s) for s in range(S)]
        if base == "gpipe":
            assert sched.max_stash() == [M] * S


def test_interleaved_zero_bubble():
    """interleaved-zb: interleaved's order, W lagging B by s B's on stage s (zb-h1's rule):
    3VM + S-1 ticks, lockstep bubble (S-1)/(3VM+S-1) at unit costs (0.34-0.42x the circular
    theory; 0.38x at most from M = 2S on), and interleaved's peak stash."""
    for S, M, V in SPLIT_GRID:
        if V == 1 or M % S:
            continue
        zb, plain = build("interleaved-zb", S, M, V), build("interleaved", S, M, V)
        assert zb.ticks == 3 * V * M + S - 1, (S, M, V)
        assert zb.lockstep_bubble(2.0) == pytest.approx((S - 1) / (3 * V * M + S - 1))
        assert zb.lockstep_bubble(2.0) <= (0.38 if M >= 2 * S else 0.42) * zb.theory_bubble()
        assert max(zb.max_stash()) == max(plain.max_stash())
        assert all(z <= p + s for s, (z, p) in enumerate(zip(zb.max_stash(), plain.max_stash())))


@pytest.mark.parametrize("kind,S,M,V", [("gpipe", 4, 16, 1), ("1f1b", 4, 16, 1), ("1f1b", 2, 6, 1),
                                        ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 3),
                                        ("1f1b-paired", 4, 16, 1), ("1f1b-paired", 2, 6, 1),
                                        ("interleaved-paired", 4, 8, 2), ("interleaved-paired", 2, 4, 3)])
def test_buffer_slots_bound_the_pipeline_buffers(kind, S, M, V):
    """The executor sizes its buffers by `buffer_slots` (entry m in slot m % slots): the
    stash (forward to backward) holds at most S entries under 1F1B and all M under GPipe;
    arrivals and gradients are used a tick or two after they arrive in these tables; the
    last stage's own loss gradients (kept from its forward to its backward) are M under
    GPipe, one under 1F1B (its backward follows its forward at once). Paired 1F1B's stash
    holds 2S-1 (its round trip in ticks), its arrivals (the inputs kept until the backward on
    stages 1..S-1) 2S-3."""
    sched = build(kind, S, M, V)
    for loss_at_forward in (False, True):
        slots = sched.buffer_slots(loss_at_forward)
        until = sched.buffer_slots(loss_at_forward, input_until_backward=True)
        if "paired" in kind:  # stage 0 (the widest stash) reads xs, not arrivals
            assert until.arrivals <= slots.stash and until.stash == slots.stash
        else:
            assert until.arrivals == slots.stash
        if kind == "1f1b-paired":
            assert slots.stash == min(M, 2 * S - 1) and until.arrivals == min(M, max(2 * S - 3, 1))
        assert slots.stash <= {"gpipe": M, "1f1b": S, "interleaved": 2 * S * V, "1f1b-paired": 2 * S - 1,
                               "interleaved-paired": 2 * S * V}[kind]
        assert slots.stash <= max(sched.max_stash())
        assert slots.arrivals <= 2 and slots.grads <= 2
        if kind == "gpipe":
            assert slots.stash == M
        if kind in ("1f1b", "1f1b-paired"):
            assert slots.loss_grads == 1
        if kind == "gpipe" and loss_at_forward:
            assert slots.loss_grads == M
    assert sched.buffer_slots(False).loss_grads == 1  # nothing kept: the backward makes it


def test_buffer_slots_never_collide():
    """Replaying a table with every buffer as a ring of `buffer_slots` slots: no entry is
    overwritten before it is consumed (an independent check of the spans)."""
    for (kind, S, M, V), until_bwd in itertools.product(
            [("gpipe", 4, 16, 1), ("1f1b", 4, 16, 1), ("1f1b", 3, 7, 1), ("interleaved", 4, 8, 2),
             ("interleaved", 2, 4, 3), ("1f1b-paired", 4, 16, 1), ("1f1b-paired", 3, 7, 1),
             ("interleaved-paired", 4, 8, 2), ("interleaved-paired", 2, 4, 3), ("zb-h1", 4, 16, 1),
             ("zb-h1", 3, 7, 1), ("zb-h1", 4, 2, 1), ("gpipe-split", 4, 8, 1), ("1f1b-split", 4, 16, 1),
             ("1f1b-split", 3, 7, 1), ("interleaved-split", 4, 8, 2), ("interleaved-split", 2, 4, 3),
             ("interleaved-zb", 4, 8, 2), ("interleaved-zb", 2, 4, 3)], (False, True)):
        sched = build(kind, S, M, V)
        G = S * V
        done = "W" if sched.split else "B"  # the op after which stash and gradients are free
        slots = sched.buffer_slots(True, input_until_backward=until_bwd)
        rings = {name: {} for name in ("arrivals", "grads", "stash", "loss_grads")}

        def put(name, g, m):
            key = (g, m % getattr(slots, name))
            assert key not in rings[name], (kind, name, g, m, rings[name][key])
            rings[name][key] = m

        def take(name, g, m):
            assert rings[name].pop((g, m % getattr(slots, name))) == m

        # the executor's order within a tick: (1) each op reads its input and gradient,
        # (2) a forward writes its stash entry (the last stage: its loss gradient),
        # (3) a backward reads its stash entry (a pair's forward wrote first),
        # (4) the tick's sends arrive. Under a split backward B only reads (checked: the
        # entry is there) and W takes.
        for row in sched.table:
            cells = [(s, op, sched.global_stage(s, op.chunk)) for s, cell in enumerate(row) for op in cell]
            for s, op, g in cells:
                if g > 0 and op.kind == ("F" if not until_bwd else done):
                    take("arrivals", g, op.microbatch)
                if op.kind == done and g < G - 1:
                    take("grads", g, op.microbatch)
                if op.kind == "B" and done == "W":
                    assert rings["stash"][(g, op.microbatch % slots.stash)] == op.microbatch
                    if g < G - 1:
                        assert rings["grads"][(g, op.microbatch % slots.grads)] == op.microbatch
                    if g > 0 and until_bwd:
                        assert rings["arrivals"][(g, op.microbatch % slots.arrivals)] == op.microbatch
            for s, op, g in cells:
                if op.kind == "F":
                    put("stash", g, op.microbatch)
                    if g == G - 1:
                        put("loss_grads", g, op.microbatch)
            for s, op, g in cells:
                if op.kind == done:
                    take("stash", g, op.microbatch)
                    if g == G - 1:
                        take("loss_grads", g, op.microbatch)
            for s, op, g in cells:
                if op.kind == "F" and g < G - 1:
                    put("arrivals", g + 1, op.microbatch)
                elif op.kind == "B" and g > 0:
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


@pytest.mark.parametrize("kind,V", [("1f1b-paired", 1), ("interleaved-paired", 2), ("interleaved-paired", 3)])
@pytest.mark.parametrize("S,M", [(2, 4), (2, 8), (4, 8), (4, 16), (3, 6), (8, 32)])
def test_paired_ticks_make_the_lockstep_bubble_theory(kind, S, M, V):
    """A paired tick carries a forward and a backward on every stage in the steady state, so
    no stage waits for a neighbour's costlier op: the lockstep bubble (forward 1, backward
    2, or any backward cost) equals (S-1)/(V*M+S-1), where the unpaired table's is
    1.4-3x it."""
    paired = build(kind, S, M, V)
    plain = build(kind.removesuffix("-paired"), S, M, V)
    for b in (1.0, 2.0, 3.0):
        assert paired.lockstep_bubble(b) == pytest.approx(paired.theory_bubble(), rel=0.03)
    if M >= 2 * S:
        assert plain.lockstep_bubble(2.0) > 1.3 * plain.theory_bubble()
    assert paired.ticks < plain.ticks
    if kind == "1f1b-paired":
        assert paired.ticks == M + 2 * (S - 1)
    else:  # the stash bound is interleaved's (no more live entries than unpaired)
        assert max(paired.max_stash()) <= max(plain.max_stash())
        assert paired.buffer_slots(True, True).stash <= plain.buffer_slots(True, True).stash


@pytest.mark.parametrize("S,M", [(2, 8), (4, 8), (4, 16)])
def test_lockstep_span_closed_forms(S, M):
    """GPipe's ticks are M + S - 1 forward ones then as many backward ones; paired 1F1B's
    are S - 1 forwards, M pairs and S - 1 backwards (the module docstring): both spans are
    (F + B)(M + S - 1) for any op costs, and with unit costs a one-op-per-cell table's span
    is its tick count."""
    cost = {"F": 1.5, "B": 3.25, "W": 0.0}
    for kind in ("gpipe", "1f1b-paired"):
        assert build(kind, S, M).lockstep_span(cost) == pytest.approx((1.5 + 3.25) * (M + S - 1))
    for kind in ("1f1b", "zb-h1", "gpipe-split"):
        sched = build(kind, S, M)
        assert sched.lockstep_span({"F": 1.0, "B": 1.0, "W": 1.0}) == sched.ticks
