"""jaxps: a JAX/XLA sharded trainer with parameter namespaces and placements.

Names are imported lazily so that `import jaxps.<light module>` (a PS server, a reader)
never pulls in JAX.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Trainer": "jaxps.trainer", "TrainConfig": "jaxps.trainer",
    "MeshConfig": "jaxps.mesh", "make_mesh": "jaxps.mesh",
    "Replicated": "jaxps.placement", "RowSharded": "jaxps.placement", "Blocked": "jaxps.placement",
    "HostTable": "jaxps.placement", "Staged": "jaxps.placement",
    "Table": "jaxps.tables.table",
    "optim": "jaxps.optim", "data": "jaxps.data", "models": "jaxps.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxps' has no attribute {name!r}")
    mod = importlib.import_module(module)
    return mod if module.endswith("." + name) else getattr(mod, name)
