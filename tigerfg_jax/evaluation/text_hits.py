r"""Picture of typed queries' top hits, run beside run.

  python -m tigerfg_jax.evaluation.text_hits --workdirs=RUN_A,RUN_B [--split=eval_text] \
      [--n=4] [--seed=S] [--k=5] [--out=text_hits.png] [--cell=96]

For N text queries of the split (the first N, or N drawn with --seed): the query text,
then for every run a row of its top-k items (image and title), each framed green when
the item is relevant to the query and red otherwise. The hits come from the runs' final
evaluation (`eval/<split>_item_emb.npy` and `eval/<split>_text_query_emb.npy`, ranked
by dot product, ties by lower row), so the picture shows exactly what was scored.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFont

from tigerfg_jax import cli
from tigerfg_jax import runpath
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data import augment, folder
from tigerfg_jax.evaluation import attention_maps, retrieval_metrics

RELEVANT, IRRELEVANT = (0, 170, 0), (210, 0, 0)
_FRAME, _PAD, _LINE = 3, 6, 12


def ranked_hits(workdir: str, split: str, k: int) -> np.ndarray:
  """int64 `[num_text_queries, k]` item rows of each text query, best first."""
  def load(kind: str) -> np.ndarray:
    path = runpath.path(workdir, "eval", f"{split}_{kind}_emb.npy")
    if not path.exists():
      raise FileNotFoundError(f"{path}: missing; the run in {workdir} has no final "
                              f"evaluation of {split}'s text queries")
    with path.open("rb") as f:
      return np.load(f)
  return retrieval_metrics.rank_by_score(load("text_query") @ load("item").T, k)


def render(texts: Sequence[str], labels: Sequence[str], hits: np.ndarray,
           relevant: np.ndarray, images: dict[int, np.ndarray], titles: Sequence[str],
           cell: int) -> Image.Image:
  """The figure: `hits` int `[runs, queries, k]` item rows, `relevant` bool alike."""
  runs, queries, k = hits.shape
  font = ImageFont.load_default()
  label_width = max(int(font.getlength(label)) for label in labels) + 2 * _PAD
  row_height = cell + 3 * _LINE + _PAD
  block = _LINE + _PAD + runs * row_height
  canvas = Image.new("RGB", (label_width + k * (cell + _PAD) + _PAD, queries * block + _PAD),
                     "white")
  draw = ImageDraw.Draw(canvas)
  for q in range(queries):
    top = q * block + _PAD
    draw.text((_PAD, top), f'"{texts[q]}"', fill="black", font=font)
    for r in range(runs):
      y = top + _LINE + _PAD + r * row_height
      draw.text((_PAD, y + cell // 2), labels[r], fill="black", font=font)
      for j in range(k):
        x = label_width + j * (cell + _PAD)
        colour = RELEVANT if relevant[r, q, j] else IRRELEVANT
        draw.rectangle([x - _FRAME, y - _FRAME, x + cell + _FRAME - 1, y + cell + _FRAME - 1],
                       fill=colour)
        canvas.paste(Image.fromarray(augment.resize(
            Image.fromarray(images[int(hits[r, q, j])]), cell, cell)), (x, y))
        for i, line in enumerate(attention_maps.wrap_text(
            titles[int(hits[r, q, j])], font, cell, 2)):
          draw.text((x, y + cell + _FRAME + i * _LINE), line, fill="black", font=font)
  return canvas


def visualize(workdirs: Sequence[str], split_name: str, n: int, out: str, *, k: int = 5,
              seed: int | None = None, cell: int = 96) -> np.ndarray:
  """Draws the figure to `out`; returns the relevance bool `[runs, n, k]` it shows."""
  config = workdir_lib.load_config(workdirs[0])
  root = workdir_lib.data_root(config, workdirs[0])
  if not os.path.isdir(os.path.join(root, split_name)):
    raise ValueError(f"--split={split_name!r}: the run's dataset {root} has splits "
                     f"{['train', *folder.eval_splits(root)]}")
  split = workdir_lib.load_split(config, workdirs[0], split_name, root, full_size=True)
  if not split.text_queries:
    raise ValueError(f"split {split_name!r} of {root} has no text queries")
  queries = attention_maps.pick_queries(len(split.text_queries), n, seed)
  hits = np.stack([ranked_hits(w, split_name, k)[queries] for w in workdirs])
  relevant = np.stack([[np.isin(row, split.text_query_positives[q])
                        for row, q in zip(run, queries)] for run in hits])
  images = {int(row): np.asarray(folder.decode_rgb(split.items[int(row)]["image"]), np.uint8)
            for row in np.unique(hits)}
  # The run folders' last two names ('smar/seed_0'): a table's runs differ by the row.
  labels = ["/".join(os.path.normpath(w).split(os.sep)[-2:]) for w in workdirs]
  figure = render([split.text_queries[q] for q in queries], labels, hits, relevant, images,
                  split.titles, cell)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  figure.save(out)
  return relevant


def define_flags() -> None:
  flags.DEFINE_list("workdirs", None, "trained runs with a text query tower, one row each",
                    required=True)
  flags.DEFINE_string("split", "eval_text", "split whose text queries are shown")
  flags.DEFINE_integer("n", 4, "number of text queries")
  flags.DEFINE_integer("k", 5, "hits per run")
  flags.DEFINE_integer("seed", None, "draw the queries with this seed (default: the first n)")
  flags.DEFINE_string("out", "text_hits.png", "output PNG")
  flags.DEFINE_integer("cell", 96, "side of each image cell in pixels")


def main(argv):
  cli.no_arguments(argv)
  args = flags.FLAGS
  relevant = visualize(args.workdirs, args.split, args.n, args.out, k=args.k,
                       seed=args.seed, cell=args.cell)
  print(f"wrote {args.out}: relevant hits per run {relevant.sum(axis=(1, 2)).tolist()} "
        f"of {relevant[0].size}")


def run() -> None:
  cli.run(main, define_flags, "tigerfg_jax.evaluation.text_hits")


if __name__ == "__main__":
  run()
