"""Tensor parallel dense namespaces: declared by logical axes, split over `model`, equal
to the replicated model."""
import jax
import numpy as np

from jaxps.data.synthetic import PlantedModel, SyntheticConfig
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models.mlp import MLPClassifier, MLPConfig
from jaxps.parallel.tensor import spec_for
from jaxps.trainer import TrainConfig, Trainer


def _fit(tp, mesh):
    data, _ = PlantedModel(SyntheticConfig(num_fields=6, vocab_size=40, seed=5)).sample(2048, 1)
    batches = [data.slice(i, i + 256) for i in range(0, 2048, 256)]
    model = MLPClassifier(MLPConfig(rows=1024, embed_dim=8, hidden=(32, 16, 8), tensor_parallel=tp))
    t = Trainer(model, mesh, TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                         dense_optimizer="adam", dense_learning_rate=0.01, compilation_cache=""))
    t.fit(batches)
    return t


def test_megatron_mlp_equals_replicated():
    tp = _fit(True, make_mesh(MeshConfig(data=4, model=2)))
    ref = _fit(False, make_mesh(MeshConfig(data=8)))
    k0 = tp.state["dense"]["mlp"]["layers"][0]["kernel"]
    k1 = tp.state["dense"]["mlp"]["layers"][1]["kernel"]
    assert k0.sharding.spec == spec_for(("embed", "mlp")) and k1.sharding.spec == spec_for(("mlp", "embed"))
    assert k0.addressable_shards[0].data.shape == (8, 16)  # each device holds half the hidden units
    np.testing.assert_allclose([h["loss"] for h in tp.history], [h["loss"] for h in ref.history], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(tp.state["dense"]), jax.tree.leaves(ref.state["dense"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
