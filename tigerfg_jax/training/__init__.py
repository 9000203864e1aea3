"""Training: the trainer (train_and_evaluate, make_trainer), the update step, the
optimizer and the metric writer. The run folder it writes is `tigerfg_jax.workdir`'s."""
