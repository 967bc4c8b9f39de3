"""Tables on the mesh: namespaces of rows keyed by hashed feature ids."""
from jaxps.tables.routing import LookupPlan, Router
from jaxps.tables.table import Table

__all__ = ["LookupPlan", "Router", "Table"]
