"""jaxps: a JAX/XLA sharded trainer with parameter namespaces and placements."""
__version__ = "0.1.0"
