r"""Answers an image or text query from an export (see `tigerfg_jax.serving.artifact`).

  python -m tigerfg_jax.serving.search --export=EXPORT --image=PATH [--k=10]
  python -m tigerfg_jax.serving.search --export=EXPORT --text="red striped mug" [--k=10]
  python -m tigerfg_jax.serving.search --export=EXPORT --items=SPLIT_FOLDER [--image=PATH]

Prints one line per hit, best first: `rank item_id score title` (rank from 1, score the
cosine similarity). A catalog smaller than k gives fewer lines.

--items adds the items of a split folder in the dataset format (docs/DATA.md; checked
by the folder validator, which also wants its queries.jsonl) to the export's catalog:
they are embedded with the exported item encoder, added to the index, and the index,
catalog.jsonl and manifest.json are rewritten. An item_id already in the catalog is an
error. The search, if --image or --text is given, runs on the updated catalog. --text
needs an export with a text query encoder (a run with config.model.text_query_encoder).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from absl import app
from absl import flags

from tigerfg_jax import cli
from tigerfg_jax.data import folder
from tigerfg_jax.serving import artifact

# Item images read and embedded at a time by --items.
_ADD_BATCH = 256


def add_items(model: artifact.ExportedModel, split_dir: str) -> int:
  """Embeds the items of the split folder `split_dir`, adds and saves them.

  Returns the number of items added. Raises `folder.DatasetError` listing every
  problem of the folder, ValueError naming an item_id already in the catalog.
  """
  split_dir = os.path.abspath(split_dir)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"--items={split_dir}: no such split folder")
  records = folder.read_split(os.path.dirname(split_dir), os.path.basename(split_dir))
  # Before the (long) embedding, so a clash fails fast.
  model.check_new_ids([r.item_id for r in records.items])
  embeddings = []
  for start in range(0, len(records.items), _ADD_BATCH):
    chunk = records.items[start:start + _ADD_BATCH]
    images = model.load_images([os.path.join(split_dir, r.image) for r in chunk], "item")
    tokens, mask = model.encode_titles([r.title for r in chunk])
    embeddings.append(model.embed_items(images, tokens, mask))
  model.add_items([r.item_id for r in records.items], [r.title for r in records.items],
                  np.concatenate(embeddings))
  model.save_catalog()
  return len(records.items)


def hit_lines(model: artifact.ExportedModel, ids: np.ndarray,
              scores: np.ndarray) -> list[str]:
  """`rank item_id score title` for each hit of one query's `[k]` ids and scores."""
  title_of = dict(zip(model.item_ids, model.titles))
  return [f"{rank} {item_id} {score:.6f} {title_of[item_id]}"
          for rank, (item_id, score) in enumerate(zip(ids, scores), start=1) if item_id]


def search_lines(model: artifact.ExportedModel, image_path: str | None, k: int,
                 text: str | None = None) -> list[str]:
  """The hit lines of the image at `image_path` or of the query string `text`."""
  if k < 1:
    raise ValueError(f"--k={k}: expected a positive number of hits")
  if text is not None:
    ids, scores = model.search_text([text], k)
  else:
    ids, scores = model.search(model.load_images([image_path], "query"), k)
  return hit_lines(model, ids[0], scores[0])


def answer(export_dir: str, image: str | None, k: int, items: str | None,
           text: str | None = None) -> list[str]:
  """The CLI's work: optionally add `items`, then the hit lines of `image` or `text`."""
  model = artifact.load(export_dir)
  if items:
    added = add_items(model, items)
    print(f"added {added} items from {items}; the catalog has {len(model.item_ids)}",
          file=sys.stderr)
  return search_lines(model, image, k, text) if image or text is not None else []


def define_flags() -> None:
  flags.DEFINE_string("export", None, "Export directory (tigerfg_jax.serving.export "
                      "--out).", required=True)
  flags.DEFINE_string("image", None, "Query image file.")
  flags.DEFINE_string("text", None, "Query text, e.g. \"red mug with blue stripes\".")
  flags.DEFINE_integer("k", 10, "Hits to print.")
  flags.DEFINE_string("items", None, "Split folder whose items are added to the catalog.")


def main(argv: Sequence[str]) -> None:
  cli.no_arguments(list(argv))
  args = flags.FLAGS
  if args.image and args.text is not None:
    raise app.UsageError("give --image or --text, not both")
  if not args.image and args.text is None and not args.items:
    raise app.UsageError("give --image=PATH or --text=QUERY to search, --items=FOLDER to "
                         "add items, or both")
  for line in answer(args.export, args.image, args.k, args.items, args.text):
    print(line)


def run() -> None:
  cli.run(main, define_flags, "tigerfg-search")


if __name__ == "__main__":
  run()
