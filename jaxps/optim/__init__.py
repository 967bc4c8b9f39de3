"""Optimizers: row-wise for tables (device and PS share them); dense params use optax."""
from jaxps.optim.rowwise import FTRL, SGD, Adagrad, Adam, RowOptimizer, make

__all__ = ["FTRL", "SGD", "Adagrad", "Adam", "RowOptimizer", "make"]
