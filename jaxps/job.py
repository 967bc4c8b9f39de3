"""A job = mesh + data + model + training configs; builds the pieces the CLI runs.

Each config is a small dataclass owned by its layer; `JobConfig` only groups them so one
TOML file (or `key=value` overrides) can describe a run.
"""
from __future__ import annotations

import dataclasses
import os

import jax
from dataclasses import dataclass, field

from jaxps.data.dataset import FileDataset
from jaxps.data.parse import CRITEO_INT_FIELDS
from jaxps.data.readers import ReaderConfig
from jaxps.data.synthetic import SyntheticConfig, generate_dataset
from jaxps.groups import WorkerGroup
from jaxps.mesh import MeshConfig
from jaxps.optim import rowwise
from jaxps.placement import parse as parse_placement
from jaxps.trainer import TrainConfig


@dataclass
class SyntheticDataConfig:
    """Generated Criteo-like data with a planted model (used when no files are given)."""

    n_train: int = 200_000
    n_test: int = 50_000
    dir: str = "runs/data"
    model: SyntheticConfig = field(default_factory=SyntheticConfig)  # fields, vocabulary, skew


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # libsvm/Criteo files; empty = synthetic
    eval: list[str] = field(default_factory=list)
    format: str = "libsvm"                          # "libsvm" or "criteo"
    max_nnz: int = 39                               # feature slots per example
    skip_bad_lines: bool = False                    # count and report bad lines instead of stopping
    batch_size: int = 4096                          # global: split over the processes
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def __post_init__(self):
        try:
            ReaderConfig(format=self.format, max_nnz=self.max_nnz, skip_bad_lines=self.skip_bad_lines)
        except ValueError as e:
            raise ValueError(f"data: {e}") from None
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class OptimizerConfig:
    """Row-wise optimizer of the model's tables. Knobs left unset (None) keep the chosen
    optimizer's own default (jaxps.optim); a knob the optimizer does not have is an error."""

    name: str = "ftrl"                      # ftrl | adagrad | adam | sgd
    learning_rate: float | None = None
    learning_rate_power: float | None = None  # ftrl
    initial_accumulator_value: float | None = None  # ftrl, adagrad
    beta: float | None = None               # ftrl
    l1: float | None = None                 # ftrl
    l2: float | None = None                 # ftrl
    l2_shrinkage: float | None = None       # ftrl
    beta_1: float | None = None             # adam
    beta_2: float | None = None             # adam
    epsilon: float | None = None            # adagrad, adam

    def build(self) -> rowwise.RowOptimizer:
        knobs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "name" and getattr(self, f.name) is not None}
        try:
            return rowwise.make(self.name, **knobs)
        except ValueError as e:
            raise ValueError(f"model.optimizer: {e}") from None


@dataclass
class ModelConfig:
    name: str = "sparse_lr"                 # "sparse_lr" (realm 2), "mlp" (realm 1), "wide_deep"
    rows: int | None = None                 # hash buckets of the table (None: the model's default)
    placement: str | None = None            # "replicated", "row_sharded[:axis[+axis]]",
                                            # "blocked[:axis]" (sparse_lr, mlp: realm 3),
                                            # "host[:collisionless|hashed]" (None: the model's
                                            # default). wide_deep: the embedding table's
    capacity: int | None = None             # unique rows per shard per step; None = from data
    embed_dim: int = 8                      # mlp, wide_deep
    hidden: list[int] = field(default_factory=lambda: [64, 32])  # mlp, wide_deep
    deep_blocks: int = 0                    # wide_deep: residual blocks instead of `hidden` (0: none)
    deep_width: int = 128                   # wide_deep: their width
    deep_placement: str = "replicated"      # wide_deep: "replicated" or "staged[:microbatches[:schedule]]"
                                            # (one block per stage: deep_blocks = mesh.stage)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class JobConfig:
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build_model(cfg: ModelConfig, dense_features: int = 0, num_slots: int = 39):
    from jaxps.models import MLPClassifier, MLPConfig, SparseLR, SparseLRConfig, WideDeep, WideDeepConfig
    common = {"optimizer": cfg.optimizer.build()}
    if cfg.rows is not None:
        common["rows"] = cfg.rows
    if cfg.placement is not None:
        try:
            common["placement"] = parse_placement(cfg.placement)
        except ValueError as e:
            raise ValueError(f"model.placement: {e}") from None
    if cfg.name == "sparse_lr":
        return SparseLR(SparseLRConfig(capacity=cfg.capacity, **common))
    if cfg.name == "mlp":
        return MLPClassifier(MLPConfig(embed_dim=cfg.embed_dim, hidden=tuple(cfg.hidden),
                                       dense_features=dense_features, **common))
    if cfg.name == "wide_deep":
        wd = {"embed_optimizer": common["optimizer"]}
        if "rows" in common:
            wd["embed_rows"] = wd["wide_rows"] = common["rows"]
        if "placement" in common:
            wd["embed_placement"] = common["placement"]
        try:
            wd["deep_placement"] = parse_placement(cfg.deep_placement)
        except ValueError as e:
            raise ValueError(f"model.deep_placement: {e}") from None
        return WideDeep(WideDeepConfig(num_slots=num_slots, embed_dim=cfg.embed_dim,
                                       hidden=tuple(cfg.hidden), dense_features=dense_features,
                                       deep_blocks=cfg.deep_blocks, deep_width=cfg.deep_width, **wd))
    raise ValueError(f"model.name={cfg.name!r}: choose 'sparse_lr', 'mlp' or 'wide_deep'")


def dense_features(cfg: DataConfig) -> int:
    """Width of the batches' dense features: Criteo's 13 integer fields, else none."""
    return CRITEO_INT_FIELDS if cfg.format == "criteo" else 0


def _synthetic(cfg: DataConfig) -> dict:
    """Generate (or reuse) the synthetic files; with several processes, process 0 writes."""
    s = cfg.synthetic
    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import sync_global_devices
        if jax.process_index() == 0:
            generate_dataset(s.dir, s.n_train, s.n_test, s.model)
        sync_global_devices("jaxps-synthetic-data")
    info = generate_dataset(s.dir, s.n_train, s.n_test, s.model)
    info["paths"] = {k: os.path.join(s.dir, v) for k, v in info["files"].items()}
    return info


def _dataset(cfg: DataConfig, paths: list[str], group: WorkerGroup | None = None) -> FileDataset:
    """This process's share of `paths`; with worker groups (training data), of its group's
    share: every process of every group reads its own byte range."""
    reader = ReaderConfig(format=cfg.format, max_nnz=cfg.max_nnz, skip_bad_lines=cfg.skip_bad_lines)
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={cfg.batch_size} (the global batch) must divide by the "
                         f"{jax.process_count()} processes")
    n, i = jax.process_count(), jax.process_index()
    if group is not None and group.count > 1:
        n, i = n * group.count, group.index * n + i
    return FileDataset(paths, reader, cfg.batch_size // jax.process_count(),  # this process's share
                       process_index=i, process_count=n)


def build_data(cfg: DataConfig, group: WorkerGroup | None = None) -> tuple[FileDataset, FileDataset | None, dict]:
    """Train/eval datasets; generates the synthetic set first when no files are given.
    With worker groups each group trains on its share of the files and evaluates on all."""
    if cfg.train:
        return _dataset(cfg, cfg.train, group), (_dataset(cfg, cfg.eval) if cfg.eval else None), {}
    info = _synthetic(cfg)
    return (_dataset(cfg, [info["paths"]["train"]], group), _dataset(cfg, cfg.eval or [info["paths"]["test"]]),
            info)


def build_eval_data(cfg: DataConfig) -> FileDataset | None:
    """The eval dataset alone (for evaluate/predict): data.eval, else the synthetic test
    set when the job trains on synthetic data."""
    if cfg.eval:
        return _dataset(cfg, cfg.eval)
    return None if cfg.train else _dataset(cfg, [_synthetic(cfg)["paths"]["test"]])
