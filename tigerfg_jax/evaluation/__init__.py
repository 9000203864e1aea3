"""Evaluation: the retrieval evaluator, its metrics, the box oracle, attention pictures.

Evaluators are plug-ins listed in `config.evals` (`evaluation.evaluators.from_config`);
the train loop only calls them. Nothing here imports `tigerfg_jax.training`.
"""
