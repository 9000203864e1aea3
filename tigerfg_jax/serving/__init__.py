"""Serving: the export writer, the export's reader (no model code), the search CLI.

Nothing here imports `tigerfg_jax.training`; `artifact` imports no model code at all.
"""
