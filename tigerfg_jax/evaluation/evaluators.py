"""Evaluators as plug-ins: `config.evals` lists them, the train loop only calls them.

  config.evals.retrieval  = {every: 0, at_end: True}    # every eval* split
  config.evals.box_oracle = {every: 0, at_end: False}   # deployed vs true-box pooling

`every` > 0 runs the evaluator every that many steps during training (its scalars go
to metrics.jsonl and TensorBoard as `<name>/...`); `at_end` runs it after the last step
(the final run also writes its files under WORKDIR/eval). An evaluator is a class
built as `cls(config, model, tokenizer, splits, mesh, workdir)` with
`run(params, *, final) -> results` and `scalars(results) -> {name: float}`; adding one
is an entry in `EVALUATORS` and a section in `config.evals`, with no change to training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import ml_collections

from tigerfg_jax.data import pipeline
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.evaluation import box_oracle, retrieval
from tigerfg_jax.models import towers


class Evaluator(Protocol):

  def run(self, params: Any, *, final: bool) -> dict[str, Any]:
    ...

  def scalars(self, results: dict[str, Any]) -> dict[str, float]:
    ...


EVALUATORS = {
    "retrieval": retrieval.RetrievalEvaluator,
    "box_oracle": box_oracle.BoxOracleEvaluator,
}


@dataclasses.dataclass(frozen=True)
class Scheduled:
  """An evaluator with its cadence (`config.evals.<name>`)."""
  name: str
  evaluator: Evaluator
  every: int
  at_end: bool

  def due(self, step: int, total_steps: int) -> tuple[bool, bool]:
    """(runs after `step`, as the final evaluation) in a run of `total_steps`."""
    final = self.at_end and step == total_steps
    return final or (self.every > 0 and step % self.every == 0), final


def from_config(config: ml_collections.ConfigDict, model: towers.TigerFG,
                tokenizer: TitleTokenizer, splits: dict[str, pipeline.Split],
                mesh: jax.sharding.Mesh, workdir: str) -> list[Scheduled]:
  """The evaluators `config.evals` turns on (every > 0 or at_end), in config order."""
  scheduled = []
  for name, settings in config.evals.items():
    if settings.every > 0 or settings.at_end:
      evaluator = EVALUATORS[name](config, model, tokenizer, splits, mesh, workdir)
      scheduled.append(Scheduled(name, evaluator, settings.every, settings.at_end))
  return scheduled
