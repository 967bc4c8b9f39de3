"""Pipeline schedules as explicit, inspectable tables: tick x stage -> (microbatch, F/B,
virtual chunk).

A schedule is a program order per stage (which forward/backward each stage runs next);
`build` replays those orders tick by tick, running an op only once its inputs exist
(forward of chunk g needs the forward of g-1; backward of g needs backward of g+1 and its
own forward's activations). The table is therefore valid by construction, and the same
table is what the SPMD pipeline executes and what `jaxps schedule` draws. Every op takes
one tick (a forward and a backward cost alike here; with virtual stages a tick is one
chunk, 1/V of a stage's layers).

Kinds: "gpipe" (all forwards, then all backwards), "1f1b" (PipeDream-flush: warm-up
forwards, then one forward one backward, which bounds the activations a stage keeps to
the number of stages), "interleaved" (Megatron's interleaved 1F1B over V virtual chunks
per stage: chunk c of stage s is global stage c*S + s; the bubble shrinks V-fold).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True)
class Op:
    microbatch: int
    kind: str        # "F" or "B"
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
    table: list[list[Op | None]] = field(default_factory=list)  # [tick][stage]

    @property
    def ticks(self) -> int:
        return len(self.table)

    def global_stage(self, stage: int, chunk: int) -> int:
        return chunk * self.stages + stage

    def bubble_fraction(self) -> float:
        """Idle cells over all cells of the table."""
        busy = sum(op is not None for row in self.table for op in row)
        return 1.0 - busy / (self.ticks * self.stages)

    def theory_bubble(self) -> float:
        """(S-1)/(V*M + S-1): GPipe and 1F1B with V = 1, the interleaved (circular) form."""
        s, m, v = self.stages, self.microbatches, self.virtual
        return (s - 1) / (v * m + s - 1)

    def lockstep_bubble(self, backward_cost: float = 2.0) -> float:
        """Idle time over all stage-time when every tick lasts as long as its slowest op (a
        forward costs 1, a backward `backward_cost`): the SPMD executor's ticks are
        synchronous (a ppermute ends each), so a stage's forward beside another's backward
        waits. Equals `theory_bubble` for GPipe (its ticks are all-forward or all-backward);
        exceeds it for 1F1B and interleaved, whose steady state mixes them."""
        cost = {"F": 1.0, "B": backward_cost}
        span = sum(max((cost[op.kind] for op in row if op), default=0.0) for row in self.table)
        busy = sum(cost[op.kind] for row in self.table for op in row if op)
        return 1.0 - busy / (span * self.stages)

    def max_stash(self) -> list[int]:
        """Per stage, the most microbatch-chunks whose forward ran and backward did not:
        the activations that stage must hold at once."""
        live = [0] * self.stages
        peak = [0] * self.stages
        for row in self.table:
            for s, op in enumerate(row):
                if op is None:
                    continue
                live[s] += 1 if op.kind == "F" else -1
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
        its backward."""
        S, G = self.stages, self.stages * self.virtual
        live: tuple[dict, ...] = ({}, {}, {}, {})  # per buffer: (stage, chunk) -> {m}
        widest = [1, 1, 1, 1]
        ARR, GRAD, STASH, LOSS = range(4)

        def add(buf: int, g: int, m: int) -> None:
            live[buf].setdefault((g % S, g // S), set()).add(m)

        for row in self.table:
            for s, op in enumerate(row):  # this tick's ops consume their entries...
                if op is None:
                    continue
                key = (s, op.chunk)
                if op.kind == "F":
                    consumed = () if input_until_backward else (ARR,)
                else:
                    consumed = (GRAD, STASH, LOSS) + ((ARR,) if input_until_backward else ())
                for buf in consumed:
                    live[buf].get(key, set()).discard(op.microbatch)
            for s, op in enumerate(row):  # ...then what this tick made is there
                if op is None:
                    continue
                g = self.global_stage(s, op.chunk)
                if op.kind == "F":
                    add(STASH, g, op.microbatch)
                    if g < G - 1:
                        add(ARR, g + 1, op.microbatch)
                    elif loss_at_forward:
                        add(LOSS, g, op.microbatch)
                elif g > 0:
                    add(GRAD, g - 1, op.microbatch)
            for i, bufs in enumerate(live):
                for ms in bufs.values():
                    if ms:
                        widest[i] = max(widest[i], max(ms) - min(ms) + 1)
        return BufferSlots(*widest)

    def render(self) -> str:
        """The table as text: one line per stage, one column per tick."""
        width = max((len(str(op)) for row in self.table for op in row if op), default=1)
        lines = []
        for s in range(self.stages):
            cells = [(str(row[s]) if row[s] else ".").rjust(width) for row in self.table]
            lines.append(f"stage {s}: " + " ".join(cells))
        return "\n".join(lines)


def _orders(kind: str, stages: int, microbatches: int, virtual: int) -> list[list[Op]]:
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
    raise ValueError(f"unknown schedule {kind!r}; choose gpipe, 1f1b or interleaved")


def build(kind: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """Replay the per-stage orders tick by tick into a table (see the module docstring)."""
    if stages < 1 or microbatches < 1 or virtual < 1:
        raise ValueError("stages, microbatches and virtual must be >= 1")
    orders = _orders(kind, stages, microbatches, virtual)
    sched = Schedule(kind, stages, microbatches, virtual)
    G = stages * virtual
    done: set[tuple[str, int, int]] = set()  # (kind, microbatch, global stage) finished
    nxt = [0] * stages
    remaining = sum(len(o) for o in orders)
    while remaining:
        row: list[Op | None] = [None] * stages
        for s in range(stages):
            if nxt[s] == len(orders[s]):
                continue
            op = orders[s][nxt[s]]
            g = sched.global_stage(s, op.chunk)
            if op.kind == "F":
                ready = g == 0 or ("F", op.microbatch, g - 1) in done
            else:
                ready = ("F", op.microbatch, g) in done and (g == G - 1 or ("B", op.microbatch, g + 1) in done)
            if ready:
                row[s] = op
        if not any(row):
            raise RuntimeError(f"{kind} schedule deadlocks at tick {len(sched.table)}")
        for s, op in enumerate(row):
            if op is not None:
                done.add((op.kind, op.microbatch, sched.global_stage(s, op.chunk)))
                nxt[s] += 1
                remaining -= 1
        sched.table.append(row)
    return sched


def draw(sched: Schedule, path: str) -> None:
    """A PNG timeline: stages x ticks, forwards and backwards coloured, microbatch labels."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("drawing needs matplotlib: pip install 'jaxps[bench]'") from e
    fig, ax = plt.subplots(figsize=(max(6, sched.ticks * 0.35), 0.6 * sched.stages + 1.2))
    fwd = plt.get_cmap("Blues")
    bwd = plt.get_cmap("Oranges")
    for t, row in enumerate(sched.table):
        for s, op in enumerate(row):
            if op is None:
                continue
            shade = 0.45 + 0.4 * (op.chunk / max(sched.virtual - 1, 1))
            ax.add_patch(plt.Rectangle((t, sched.stages - 1 - s), 1, 1,
                                       color=(fwd if op.kind == "F" else bwd)(shade), ec="white"))
            ax.text(t + 0.5, sched.stages - 0.5 - s, str(op.microbatch), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, sched.ticks)
    ax.set_ylim(0, sched.stages)
    ax.set_yticks([sched.stages - 0.5 - s for s in range(sched.stages)],
                  [f"stage {s}" for s in range(sched.stages)])
    ax.set_xlabel("tick (blue: forward, orange: backward; darker: later virtual chunk)")
    ax.set_title(f"{sched.kind}: S={sched.stages} M={sched.microbatches} V={sched.virtual}  "
                 f"bubble {sched.bubble_fraction():.3f} (theory {sched.theory_bubble():.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
