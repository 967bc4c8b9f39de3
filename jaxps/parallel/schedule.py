"""Pipeline schedules as explicit, inspectable tables: tick x stage -> ops, each op a
(microbatch, F/B/W, virtual chunk).

A cell of the table holds the ops a stage runs at that tick: none, one, or a *pair* (one
forward then one backward, each of its own microbatch and chunk). The SPMD executor runs a
tick's forward conditional and then its backward conditional on every stage, and ends the
tick with one ppermute each way, so a pair costs one tick. An op needs its inputs from
earlier ticks (forward of global stage g needs the forward of g-1, backward of g the
backward of g+1 and its own forward), except that a backward may follow its own forward in
the same cell (the forward runs first), which the last global stage uses.

`build` replays per-stage program orders tick by tick, so a table is valid by
construction, and the same table is what the SPMD pipeline executes and what
`jaxps schedule` draws.

Kinds: "gpipe" (all forwards, then all backwards), "1f1b" (PipeDream-flush: warm-up
forwards, then one forward one backward in alternate ticks, which bounds the activations a
stage keeps to the number of stages), "interleaved" (Megatron's interleaved 1F1B over V
virtual chunks per stage: chunk c of stage s is global stage c*S + s; the bubble shrinks
V-fold), their paired forms "1f1b-paired" and "interleaved-paired", whose steady-state
ticks carry a forward *and* a backward on every stage, and their split-backward forms
"gpipe-split", "1f1b-split", "interleaved-split" (each backward as B then W, see below)
with the zero-bubble ones "zb-h1" and "interleaved-zb" (W deferred).

Why kinds and not a `split_backward` flag: like pairing, a split is a different table
replayed from the base kind's order (`SPLIT` names the base), and one name selects the
table everywhere a schedule is named (`jaxps schedule`, `Staged(schedule=...)`, the LM's
config, the benchmark), with no combination that means nothing (paired and split).

Why pairs. The executor's ticks are synchronous: a tick lasts as long as its slowest
stage. In 1F1B's steady state one stage runs a forward (cost ~1) beside a neighbour's
backward (cost ~2) and waits; `lockstep_bubble` measures that (S=4, M=16: 0.33 against the
theory 0.16). In a paired tick every stage does the same work (a forward and a backward).

The paired 1F1B, derived. A microbatch's forward moves one stage per tick and its backward
one stage per tick, and the last stage runs a microbatch's backward in the tick of its
forward. Stage 0 injects one microbatch per tick (ticks 0..M-1), so F(m, s) runs at tick
m + s and B(m, s) at tick m + 2(S-1) - s: M + 2(S-1) ticks in all. The first S-1 ticks
hold forwards only (cost 1: stage 0 runs F while the wave fills), the middle M ticks
have a pair on some stage (cost 1 + b), the last S-1 backwards only (cost b), so with a
backward costing b forwards the span is (S-1) + M(1+b) + (S-1)b = (1+b)(M+S-1) against
a stage's busy (1+b)M: the lockstep bubble is exactly (S-1)/(M+S-1), the theory, for
every b. The price is memory: stage s holds a microbatch from tick m+s to m+2(S-1)-s,
i.e. 2(S-1-s)+1 stash entries (2S-1 on stage 0, against S for 1F1B). That is forced:
with synchronous ticks a round trip from stage 0 to the last stage and back is 2S-1 ticks
whatever the schedule, so a stage 0 that starts one microbatch per tick has 2S-1 in
flight; capping its stash at S lets it start only S per 2S-1 ticks (a lockstep bubble
above 1F1B's). Bounded memory and a theory bubble need asynchronous stages, or a backward
split into input- and weight-gradient halves (zero-bubble schedules): "zb-h1" below.

Zero bubble, split backward ("zb-h1", Qi et al. 2023, "Zero Bubble Pipeline Parallelism",
handcrafted schedule ZB-H1). The backward splits into B, the input gradient (sent to the
previous stage: the critical path) and W, the weight gradient (local: it can wait). For a
dense layer F, B and W are one matmul each, so with one op per cell every cell costs the
same and synchronous ticks cost nothing: the lockstep bubble is the table's idle cells.
Each stage keeps 1F1B's order of forwards and B's and runs W(k) after B(k+s) on stage s
(W lags B by s microbatches; the s deferred W's finish the stage's program). Then every
stage idles exactly S-1 ticks: stage s waits s ticks for its first forward and S-1-s for
its first B (which reaches it at tick 2S-1-s, after its S-s warm-up forwards), and never
again -- B travels the pipe one stage per tick in the cool-down and the deferred W's fill
the gaps 1F1B leaves there. Span 3M + S-1 ticks, bubble (S-1)/(3M+S-1) for M >= S: a
third of 1F1B's (S-1)/(M+S-1), at unit costs, in lockstep. Memory stays 1F1B's peak: a
stage holds a microbatch from F to W, S-s entries whose B has not run plus s deferred W's,
S on every stage (1F1B: S-s). A W also needs the output gradient its B used, so that lives
until the W too (`buffer_slots`).

Split backward, W at once ("gpipe-split", "1f1b-split", "interleaved-split"). The base
kind's order with each B followed by its W, one op per cell, every op a unit. Span
3VM + 2(S-1) ticks, so the lockstep bubble is 2(S-1)/(3VM + 2(S-1)) for every S, M, V (at
unit costs the idle cells; tested): in 1F1B-split the last stage runs F, B, W of one
microbatch in consecutive ticks from tick S-1 on, B(m) reaches stage s at tick
3m + 2S-1-s, and stage 0's last W ends at 3M + 2(S-1); in GPipe-split the forwards end at
M+S-1, the first B needs S-1 more ticks to reach stage 0, which then runs 2M ops. That is
below the theory (S-1)/(VM+S-1) = 3(S-1)/(3VM + 3(S-1)): a stage sends its input gradient
after B, one unit, not after a whole backward's two, so the backward's fill costs S-1
ticks instead of 2(S-1) (2/3-0.79x the theory for S in 2..8, M >= S; 2/3 as M grows). Memory is the base
kind's on every stage (tested): W directly follows B in a stage's program, so no forward
runs between them and the peak (right after a forward) is unchanged -- 1F1B-split holds
S-s entries, GPipe-split M, interleaved-split interleaved's; only the output gradient
lives a tick longer (under interleaving a few gradient slots more: 3 for 2 at S = 4).

Interleaved zero bubble ("interleaved-zb"): interleaved's order with zb-h1's deferral (W
lags B by s of the stage's B's). The deferred W's fill the idle ticks as in zb-h1: span
3VM + S-1, bubble (S-1)/(3VM + S-1), about 0.36x the circular theory; stage s holds up
to s entries more than interleaved (its deferred W's), and the peak over the stages is
interleaved's (stage 0's; tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True)
class Op:
    microbatch: int
    kind: str        # "F", "B" (whole backward, or with W: the input gradient) or "W" (weight gradient)
    chunk: int = 0   # virtual chunk on this stage

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


class BufferSlots(NamedTuple):
    """Ring-buffer slots per stage and chunk (see `Schedule.buffer_slots`)."""
    arrivals: int  # activations received, kept until this stage's forward (or backward)
    grads: int     # input-gradients received, waiting for this stage's backward
    stash: int     # what a forward keeps for its backward (stage input or residuals)
    loss_grads: int  # the last global stage's d loss / d h, from its forward to its backward


@dataclass
class Schedule:
    kind: str
    stages: int
    microbatches: int
    virtual: int = 1
    table: list[list[tuple[Op, ...]]] = field(default_factory=list)  # [tick][stage] -> ops, F first

    @property
    def ticks(self) -> int:
        return len(self.table)

    def global_stage(self, stage: int, chunk: int) -> int:
        return chunk * self.stages + stage

    def ops(self):
        """(tick, stage, op) in execution order (within a cell the forward first)."""
        for t, row in enumerate(self.table):
            for s, cell in enumerate(row):
                for op in cell:
                    yield t, s, op

    @property
    def paired(self) -> bool:
        """Whether some cell carries a forward and a backward."""
        return any(len(cell) > 1 for row in self.table for cell in row)

    @property
    def split(self) -> bool:
        """Whether the backward is split into B (input gradient) and W (weight gradient)."""
        return any(op.kind == "W" for _, _, op in self.ops())

    @property
    def releases(self) -> str:
        """The op kind after which a microbatch's stash entry (and the output gradient) is
        no longer needed: W in a split schedule, else B."""
        return "W" if self.split else "B"

    def bubble_fraction(self) -> float:
        """Idle stage-time over all stage-time with every op costing alike; for one op per
        cell, the idle cells over all cells."""
        return self._lockstep({"F": 1.0, "B": 1.0, "W": 1.0})

    def theory_bubble(self) -> float:
        """(S-1)/(V*M + S-1): GPipe and 1F1B with V = 1, the interleaved (circular) form."""
        s, m, v = self.stages, self.microbatches, self.virtual
        return (s - 1) / (v * m + s - 1)

    def lockstep_summary(self) -> tuple[str, float]:
        """(the cost model in words, the lockstep bubble under it): a backward costs 2
        forwards, i.e. B = W = 1 forward in the split kinds."""
        return ("B = W = 1 forward" if self.split else "backward = 2 forwards"), self.lockstep_bubble(2.0)

    def lockstep_bubble(self, backward_cost: float = 2.0) -> float:
        """Idle time over all stage-time when every tick lasts as long as its slowest op (a
        forward costs 1, a backward `backward_cost`): the SPMD executor's ticks are
        synchronous (a ppermute ends each), so a stage's forward beside another's backward
        waits. Equals `theory_bubble` for GPipe (its ticks are all-forward or all-backward);
        exceeds it for 1F1B and interleaved, whose steady state mixes them, and equals it again
        for 1f1b-paired (see the module docstring). A paired cell costs 1 + backward_cost. In a
        split schedule (the "-split" kinds, "zb-h1", "interleaved-zb") B and W each cost half
        a backward (one matmul each for a dense layer), so at backward_cost 2 every op costs
        a forward and the lockstep bubble is the table's idle cells."""
        half = backward_cost / 2
        return self._lockstep({"F": 1.0, "B": half if self.split else backward_cost, "W": half})

    def lockstep_span(self, cost: dict[str, float]) -> float:
        """The step's length when every tick lasts as long as its costliest cell, an op of
        kind k costing cost[k] ("F", "B", "W"; a paired cell the sum of its two): with
        measured op times, what this executor would take without per-tick overhead."""
        return sum(max(sum(cost[op.kind] for op in cell) for cell in row) for row in self.table)

    def _lockstep(self, cost: dict[str, float]) -> float:
        busy = sum(cost[op.kind] for _, _, op in self.ops())
        return 1.0 - busy / (self.lockstep_span(cost) * self.stages)

    def max_stash(self) -> list[int]:
        """Per stage, the most microbatch-chunks whose forward ran and backward (in a split
        schedule: W) did not: the activations that stage must hold at once (a paired cell's
        forward stashes before its backward frees)."""
        live = [0] * self.stages
        peak = [0] * self.stages
        release = self.releases
        for _, s, op in self.ops():
            live[s] += 1 if op.kind == "F" else -1 if op.kind == release else 0
            peak[s] = max(peak[s], live[s])
        return peak

    def buffer_slots(self, loss_at_forward: bool = False, input_until_backward: bool = False) -> BufferSlots:
        """Slots a stage needs per chunk in each of its buffers when an entry for microbatch
        m lives in slot m % slots: the widest span of microbatches live at once on any
        (stage, chunk), so entries never collide. An arrival lives from the end of the tick
        the previous global stage ran its forward until this stage's forward (or backward,
        with `input_until_backward`: the backward needs the stage input); a stash entry
        from this stage's forward until its backward; a gradient from its arrival (the next
        global stage's backward) until this stage's backward. The first global stage reads
        its inputs from xs and has no arrivals; the last one makes its own gradient: at its
        forward with `loss_at_forward`, kept until its backward (`loss_grads`), or else at
        its backward. In a split schedule "until its backward" means until its W, which
        needs all three (B only reads them)."""
        S, G = self.stages, self.stages * self.virtual
        release = self.releases  # the op that frees stash, gradient (and kept input)
        live: tuple[dict, ...] = ({}, {}, {}, {})  # per buffer: (stage, chunk) -> {m}
        widest = [1, 1, 1, 1]
        ARR, GRAD, STASH, LOSS = range(4)

        def add(buf: int, g: int, m: int) -> None:
            live[buf].setdefault((g % S, g // S), set()).add(m)

        def drop(bufs: tuple, s: int, op: Op) -> None:
            for buf in bufs:
                live[buf].get((s, op.chunk), set()).discard(op.microbatch)

        def measure() -> None:
            for i, bufs in enumerate(live):
                for ms in bufs.values():
                    if ms:
                        widest[i] = max(widest[i], max(ms) - min(ms) + 1)

        # In the executor's order within a tick: (1) every op reads its arrival and
        # gradient; (2) the forward writes its stash entry (and the last stage its loss
        # gradient); (3) the backward reads the stash, so a pair's forward entry and
        # backward entry are live at once; (4) what the tick sent arrives.
        for row in self.table:
            for s, cell in enumerate(row):
                for op in cell:
                    if op.kind == "F":
                        drop(() if input_until_backward else (ARR,), s, op)
                    elif op.kind == release:
                        drop((GRAD,) + ((ARR,) if input_until_backward else ()), s, op)
            for s, cell in enumerate(row):
                for op in cell:
                    g = self.global_stage(s, op.chunk)
                    if op.kind == "F":
                        add(STASH, g, op.microbatch)
                        if g == G - 1 and loss_at_forward:
                            add(LOSS, g, op.microbatch)
            measure()
            for s, cell in enumerate(row):
                for op in cell:
                    if op.kind == release:
                        drop((STASH, LOSS), s, op)
            for s, cell in enumerate(row):
                for op in cell:
                    g = self.global_stage(s, op.chunk)
                    if op.kind == "F" and g < G - 1:
                        add(ARR, g + 1, op.microbatch)
                    elif op.kind == "B" and g > 0:
                        add(GRAD, g - 1, op.microbatch)
            measure()
        return BufferSlots(*widest)

    def render(self) -> str:
        """The table as text: one line per stage, one column per tick (a pair as F3+B1)."""
        def text(cell: tuple[Op, ...]) -> str:
            return "+".join(map(str, cell)) if cell else "."

        width = max((len(text(cell)) for row in self.table for cell in row), default=1)
        lines = []
        for s in range(self.stages):
            cells = [text(row[s]).rjust(width) for row in self.table]
            lines.append(f"stage {s}: " + " ".join(cells))
        return "\n".join(lines)


def _orders(kind: str, stages: int, microbatches: int, virtual: int) -> list[list[Op]]:
    """Each stage's program order of ops."""
    S, M, V = stages, microbatches, virtual
    if kind == "gpipe":
        if V != 1:
            raise ValueError("gpipe has no virtual stages (use interleaved)")
        return [[Op(m, "F") for m in range(M)] + [Op(m, "B") for m in range(M)] for _ in range(S)]
    if kind == "1f1b":
        if V != 1:
            raise ValueError("1f1b has no virtual stages (use interleaved)")
        orders = []
        for s in range(S):
            warm = min(S - 1 - s, M)
            order = [Op(m, "F") for m in range(warm)]
            for i in range(M - warm):
                order += [Op(warm + i, "F"), Op(i, "B")]
            order += [Op(m, "B") for m in range(M - warm, M)]
            orders.append(order)
        return orders
    if kind == "interleaved":
        if M % S:
            raise ValueError(f"interleaved needs microbatches ({M}) divisible by stages ({S})")
        total = M * V

        def fwd(k: int) -> Op:  # k-th forward of a stage: groups of S microbatches per chunk
            return Op((k // (S * V)) * S + k % S, "F", (k // S) % V)

        def bwd(k: int) -> Op:
            return Op((k // (S * V)) * S + k % S, "B", V - 1 - (k // S) % V)

        orders = []
        for s in range(S):
            warm = min((S - 1 - s) * 2 + (V - 1) * S, total)
            order = [fwd(k) for k in range(warm)]
            for i in range(total - warm):
                order += [fwd(warm + i), bwd(i)]
            order += [bwd(k) for k in range(total - warm, total)]
            orders.append(order)
        return orders
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(KINDS)}")


def _split_orders(orders: list[list[Op]], deferred: bool) -> list[list[Op]]:
    """Each B followed by its W: at once (the next op of the stage's program), or, deferred,
    W(k) after the stage's (k+s)-th B: on stage s W lags B by s B's, and the s deferred W's
    finish the stage's program (zb-h1; see the module docstring)."""
    out = []
    for s, order in enumerate(orders):
        new, pending = [], []
        for op in order:
            new.append(op)
            if op.kind == "B":
                pending.append(Op(op.microbatch, "W", op.chunk))
                if len(pending) > (s if deferred else 0):
                    new.append(pending.pop(0))
        out.append(new + pending)
    return out


PAIRED = {"1f1b-paired": "1f1b", "interleaved-paired": "interleaved"}
# split kinds: (base kind whose F and B order they keep, whether W is deferred)
SPLIT = {"gpipe-split": ("gpipe", False), "1f1b-split": ("1f1b", False),
         "interleaved-split": ("interleaved", False), "zb-h1": ("1f1b", True),
         "interleaved-zb": ("interleaved", True)}
KINDS = ("gpipe", "1f1b", "interleaved") + tuple(PAIRED) + tuple(SPLIT)
# What a `Staged` tower and `jaxps lm` run unless told otherwise. The executor's ticks are
# synchronous, so the textbook 1F1B table (a forward beside a neighbour's two-matmul
# backward) idles 2.6x the theory where stages run at once (benchmarks/pipeline.py, traced);
# zb-h1 keeps 1F1B's order and its peak of S microbatches in flight (held on every stage,
# where 1F1B's stage s holds S - s), its ops cost about alike, and it idles 0.76-0.81x the
# theory; its compiled temporaries at S = 4 are 3-4 activations above 1F1B's (the output
# gradients its deferred W's keep; tests/test_pipeline.py). Tightest memory: "1f1b-split"
# (1F1B's exactly, at about the theory); under remat, where B and W each recompute the
# forward: "1f1b-paired".
DEFAULT = "zb-h1"


def _ready(op: Op, g: int, G: int, done: set, cell: tuple[Op, ...] = ()) -> bool:
    """op's inputs exist: from earlier ticks, or (a backward) its own forward earlier in
    the same cell. A W needs its own B (the output gradient it received, and the stash)."""
    if op.kind == "F":
        return g == 0 or ("F", op.microbatch, g - 1) in done
    if op.kind == "W":
        return ("B", op.microbatch, g) in done
    own = ("F", op.microbatch, g) in done or Op(op.microbatch, "F", op.chunk) in cell
    return own and (g == G - 1 or ("B", op.microbatch, g + 1) in done)


def _replay(sched: Schedule, orders: list[list[Op]], paired: bool = False) -> None:
    """Each stage runs, at every tick, the next op of its program as soon as it is ready; or,
    `paired`, up to a forward and a backward per cell: the stage keeps its program's order of
    forwards and its order of backwards, and runs the next forward if ready, then the next
    backward if ready (its own forward may be the one just run). With 1F1B's orders the
    paired replay is the derivation in the module docstring: F(m, s) at tick m + s, B(m, s)
    at m + 2(S-1) - s."""
    S, G = sched.stages, sched.stages * sched.virtual
    # per stage, the queues whose heads may share a cell: one, or forwards and backwards
    queues = [[[op for op in o if op.kind == "F"], [op for op in o if op.kind != "F"]] if paired else [o]
              for o in orders]
    done: set[tuple[str, int, int]] = set()  # (kind, microbatch, global stage) finished
    nxt = [[0] * len(q) for q in queues]
    while any(n < len(q) for qs, ns in zip(queues, nxt) for q, n in zip(qs, ns)):
        row: list[tuple[Op, ...]] = []
        for s in range(S):
            cell: tuple[Op, ...] = ()
            for q, n in zip(queues[s], nxt[s]):
                if n < len(q) and _ready(q[n], sched.global_stage(s, q[n].chunk), G, done, cell):
                    cell += (q[n],)
            row.append(cell)
        if not any(row):
            raise RuntimeError(f"{sched.kind} schedule deadlocks at tick {len(sched.table)}")
        for s, cell in enumerate(row):
            for op in cell:
                done.add((op.kind, op.microbatch, sched.global_stage(s, op.chunk)))
                nxt[s][1 if paired and op.kind != "F" else 0] += 1
        sched.table.append(row)


def build(kind: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """Replay the per-stage orders tick by tick into a table (see the module docstring)."""
    if stages < 1 or microbatches < 1 or virtual < 1:
        raise ValueError("stages, microbatches and virtual must be >= 1")
    if kind in SPLIT:
        base, deferred = SPLIT[kind]
        orders = _split_orders(_orders(base, stages, microbatches, virtual), deferred)
    else:
        orders = _orders(PAIRED.get(kind, kind), stages, microbatches, virtual)
    sched = Schedule(kind, stages, microbatches, virtual)
    _replay(sched, orders, paired=kind in PAIRED)
    return sched


def draw(sched: Schedule, path: str) -> None:
    """A PNG timeline: stages x ticks, forwards, backwards (B) and weight gradients (W)
    coloured, microbatch labels."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("drawing needs matplotlib: pip install 'jaxps[bench]'") from e
    fig, ax = plt.subplots(figsize=(max(6, sched.ticks * 0.35), 0.6 * sched.stages + 1.2))
    cmaps = {"F": plt.get_cmap("Blues"), "B": plt.get_cmap("Oranges"), "W": plt.get_cmap("Greens")}
    for t, s, op in sched.ops():
        cell = sched.table[t][s]
        w = 1.0 / len(cell)  # a paired cell: forward left half, backward right half
        x = t + w * cell.index(op)
        shade = 0.45 + 0.4 * (op.chunk / max(sched.virtual - 1, 1))
        ax.add_patch(plt.Rectangle((x, sched.stages - 1 - s), w, 1, color=cmaps[op.kind](shade), ec="white"))
        ax.text(x + w / 2, sched.stages - 0.5 - s, str(op.microbatch), ha="center", va="center",
                fontsize=7 if len(cell) == 1 else 6)
    ax.set_xlim(0, sched.ticks)
    ax.set_ylim(0, sched.stages)
    ax.set_yticks([sched.stages - 0.5 - s for s in range(sched.stages)],
                  [f"stage {s}" for s in range(sched.stages)])
    ax.set_xlabel("tick (blue: forward, orange: B = input gradient, green: W = weight gradient)" if sched.split
                  else "tick (blue: forward, orange: backward; darker: later virtual chunk)")
    cost, lockstep = sched.lockstep_summary()
    ax.set_title(f"{sched.kind}: S={sched.stages} M={sched.microbatches} V={sched.virtual}  "
                 f"bubble {sched.bubble_fraction():.3f}\nlockstep ({cost}) {lockstep:.3f} "
                 f"(theory {sched.theory_bubble():.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
