"""A small decoder-only Transformer LM for DP x PP x TP (realm 4).

Its blocks are stacked per pipeline stage ([S, ...] leaves, split over `stage`), and the
block parameters name their logical axes so attention heads and MLP units split over
`model` (Megatron: q/k/v and the first MLP layer column-split, the output projections
row-split). Token and position embeddings come before the pipeline, the final norm and
output layer are the pipeline's loss head. Pure functions over parameter trees: the
pipeline needs per-stage VJPs, which plain functions give directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class TransformerConfig:
    vocab: int = 64
    seq: int = 32
    d_model: int = 64
    heads: int = 4
    mlp: int = 128
    stages: int = 2           # one block per stage


# logical axes of each block leaf, after the leading stage axis (jaxps.parallel.tensor rules)
BLOCK_AXES = {"ln1": ("embed",), "ln2": ("embed",), "wq": ("embed", "heads"), "wk": ("embed", "heads"),
              "wv": ("embed", "heads"), "wo": ("heads", "embed"), "w1": ("embed", "mlp"), "w2": ("mlp", "embed")}


def init(cfg: TransformerConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d, S = cfg.d_model, cfg.stages
    n = lambda *shape, scale: jnp.asarray(rng.normal(0, scale, shape), jnp.float32)  # noqa: E731
    blocks = {"ln1": jnp.ones((S, d)), "ln2": jnp.ones((S, d)),
              "wq": n(S, d, d, scale=d ** -0.5), "wk": n(S, d, d, scale=d ** -0.5),
              "wv": n(S, d, d, scale=d ** -0.5), "wo": n(S, d, d, scale=d ** -0.5 / S),
              "w1": n(S, d, cfg.mlp, scale=d ** -0.5), "w2": n(S, cfg.mlp, d, scale=cfg.mlp ** -0.5 / S)}
    return {"embed": {"tok": n(cfg.vocab, d, scale=0.02), "pos": n(cfg.seq, d, scale=0.02)},
            "blocks": blocks,
            "head": {"ln": jnp.ones((d,)), "out": n(d, cfg.vocab, scale=d ** -0.5)}}


def _norm(x, g):
    return g * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)  # RMSNorm


def block(cfg: TransformerConfig):
    """block(p, x): one pre-norm decoder layer; x [batch, seq, d] -> same shape."""
    H, dh = cfg.heads, cfg.d_model // cfg.heads

    def f(p, x):
        b, t, d = x.shape
        h = _norm(x, p["ln1"])
        split = lambda w: (h @ w).reshape(b, t, H, dh)  # noqa: E731
        q, k, v = split(p["wq"]), split(p["wk"]), split(p["wv"])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        causal = jnp.tril(jnp.ones((t, t), bool))
        attn = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d) @ p["wo"]
        return x + jax.nn.gelu(_norm(x, p["ln2"]) @ p["w1"]) @ p["w2"]

    return f


def embed(e: dict, tokens: jax.Array) -> jax.Array:
    return jnp.take(e["tok"], tokens, axis=0) + e["pos"][None, :tokens.shape[1]]


def head_loss(hd: dict, h: jax.Array, targets: jax.Array) -> jax.Array:
    """Summed next-token cross-entropy of a microbatch."""
    logits = _norm(h, hd["ln"]) @ hd["out"]
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))


def synthetic_tokens(cfg: TransformerConfig, n: int, seed: int) -> np.ndarray:
    """[n, seq + 1] sequences x_i = (start + i * stride) mod vocab with a random start and
    stride per sequence: predictable after two tokens, so a working model's loss falls."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, cfg.vocab, (n, 1))
    stride = rng.integers(1, 5, (n, 1))
    return ((start + stride * np.arange(cfg.seq + 1)[None]) % cfg.vocab).astype(np.int32)
