"""Data: dataset folders, synthetic catalog, ArrayRecord ingestion, Grain pipelines.

The pipelines live in `tigerfg_jax.data.pipeline` (load_split, train_iterator,
eval_item_batches, eval_query_batches); docs/DATA.md describes the whole package.
"""

from __future__ import annotations

from tigerfg_jax.data.folder import DatasetError, eval_splits


def catalog_root(data_config, workdir: str) -> str:
  """`data_config.root`, or the synthetic catalog written once to `workdir/data`."""
  # Imported here: `python -m tigerfg_jax.data.synthetic` imports this package first,
  # and the module must not already be in sys.modules when it runs as __main__.
  from tigerfg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.catalog_root(data_config, workdir)
