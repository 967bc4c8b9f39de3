"""The Transformer LM: pipelined (1F1B over `stage`) with heads/MLP split over `model` and
the batch over `data`, its loss and gradients equal the plain model's; and it trains from
the CLI on the 2x2x2 mesh."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models.transformer_lm import (BLOCK_AXES, TransformerConfig, block, embed, head_loss, init,
                                         synthetic_tokens)
from jaxps.parallel.pipeline import pipeline_value_and_grad
from jaxps.parallel.schedule import build
from jaxps.parallel.tensor import spec_for


@pytest.mark.parametrize("kind", ["1f1b", "1f1b-paired", "zb-h1"])
def test_pipelined_tp_lm_equals_plain_model(kind):
    cfg = TransformerConfig(vocab=32, seq=8, d_model=16, heads=4, mlp=32, stages=2)
    mesh = make_mesh(MeshConfig(data=2, stage=2, model=2))
    params = init(cfg, 0)
    tokens = jnp.asarray(synthetic_tokens(cfg, 8, 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    M = 4
    f = block(cfg)
    blocks = {k: jax.device_put(v, NamedSharding(mesh, P("stage", *spec_for(BLOCK_AXES[k]))))
              for k, v in params["blocks"].items()}

    def pipelined(blocks, head, e):
        x = embed(e, inputs)
        r = pipeline_value_and_grad(f, head_loss, blocks, x.reshape(M, 2, cfg.seq, -1),
                                    targets.reshape(M, 2, cfg.seq), build(kind, 2, M), mesh,
                                    input_grads=True, head=head)
        return r

    r = jax.jit(pipelined)(blocks, params["head"], params["embed"])

    def plain(p):
        h = embed(p["embed"], inputs)
        for s in range(cfg.stages):
            h = f(jax.tree.map(lambda a: a[s], p["blocks"]), h)
        return head_loss(p["head"], h, targets)

    l_ref, g_ref = jax.value_and_grad(plain)(params)
    np.testing.assert_allclose(float(r.loss), float(l_ref), rtol=1e-5)
    for k in params["blocks"]:
        np.testing.assert_allclose(np.asarray(r.params[k]), np.asarray(g_ref["blocks"][k]), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(r.head["out"]), np.asarray(g_ref["head"]["out"]), rtol=2e-4, atol=1e-5)
    # the input gradient, pulled back through the embedding, is the embedding's gradient
    _, vjp = jax.vjp(lambda e: embed(e, inputs), params["embed"])
    (g_embed,) = vjp(r.inputs.reshape(8, cfg.seq, -1))
    np.testing.assert_allclose(np.asarray(g_embed["tok"]), np.asarray(g_ref["embed"]["tok"]), rtol=2e-4, atol=1e-5)


@pytest.mark.slow
def test_lm_trains_on_2x2x2_mesh_from_the_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "jaxps.cli", "lm", "steps=30", "mesh.data=2", "mesh.stage=2",
                          "mesh.model=2", "out=lm"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "lm/metrics.json").read_text())
    assert m["mesh"] == {"data": 2, "stage": 2, "model": 2}
    assert m["final_loss"] < 0.6 * m["first_loss"], (m["first_loss"], m["final_loss"])
