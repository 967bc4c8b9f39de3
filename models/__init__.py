"""Model definitions, installed as `jaxps.models`."""
from jaxps.models.mlp import MLPClassifier, MLPConfig
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig
from jaxps.models.wide_deep import WideDeep, WideDeepConfig

__all__ = ["MLPClassifier", "MLPConfig", "SparseLR", "SparseLRConfig", "WideDeep", "WideDeepConfig"]
