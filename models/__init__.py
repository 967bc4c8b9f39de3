"""Model definitions, installed as `jaxps.models`."""
from jaxps.models.mlp import MLPClassifier, MLPConfig
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig

MODELS = {"sparse_lr": (SparseLR, SparseLRConfig), "mlp": (MLPClassifier, MLPConfig)}

__all__ = ["MLPClassifier", "MLPConfig", "SparseLR", "SparseLRConfig", "MODELS"]
