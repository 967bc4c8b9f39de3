"""Realms 3 and 4: blocked operators, pipeline schedules and stages on the mesh."""
