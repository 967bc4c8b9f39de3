"""`jaxps plan`: bytes per namespace and device, and Auto placements resolved by budget."""
import jax

from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig
from jaxps.optim import FTRL
from jaxps.placement import Auto, HostTable, RowSharded
from jaxps.plan import plan_model, resolve, table_bytes_per_device
from jaxps.step import dense_optimizer
from jaxps.tables.table import Table


def test_auto_placement_follows_the_budget():
    mesh = make_mesh(MeshConfig(data=8))
    t = Table("w", rows=8_000_000, dim=4, placement=Auto("data", host_kind="collisionless"), optimizer=FTRL())
    per_device = table_bytes_per_device(t, 8)
    assert per_device == 1_000_000 * 4 * 4 * 3
    assert resolve(t, mesh, budget_bytes=4 * per_device).placement == RowSharded("data")
    assert resolve(t, mesh, budget_bytes=per_device).placement == HostTable("collisionless")


def test_plan_reports_bytes_per_device_and_realm():
    mesh = make_mesh(MeshConfig(data=4, model=2))
    for placement, per_device in ((RowSharded("data"), 1024 * 3 * 4 // 4), (HostTable(), 0)):
        plans = plan_model(SparseLR(SparseLRConfig(rows=1024, placement=placement)), mesh,
                           dense_optimizer("sgd", 0.1))
        table = next(p for p in plans if p.name == "weights")
        assert table.total_bytes == 1024 * 4 * 3  # weights + FTRL's two slots
        assert table.bytes_per_device == per_device and table.realm == 2
    assert len(jax.devices()) == 8


def test_plan_shows_tensor_parallel_and_staged_dense_namespaces():
    from jaxps.models import MLPClassifier, MLPConfig, WideDeep, WideDeepConfig
    from jaxps.placement import Staged
    mesh = make_mesh(MeshConfig(data=4, model=2))
    mlp = {p.name: p for p in plan_model(MLPClassifier(MLPConfig(hidden=(32, 16), tensor_parallel=True)),
                                         mesh, dense_optimizer("sgd", 0.1))}["mlp"]
    assert mlp.placement.startswith("TensorParallel(model)") and mlp.realm == 4
    assert mlp.bytes_per_device < mlp.total_bytes
    mesh = make_mesh(MeshConfig(data=2, stage=4))
    wd = {p.name: p for p in plan_model(WideDeep(WideDeepConfig(num_slots=6, deep_blocks=4, deep_width=16,
                                                                 deep_placement=Staged())),
                                        mesh, dense_optimizer("sgd", 0.1))}
    assert wd["blocks_w"].placement == "Staged(stage)" and wd["blocks_w"].bytes_per_device == 4 * 16 * 16
