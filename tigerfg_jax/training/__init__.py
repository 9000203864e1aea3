"""Training: the loop, its step and what feeds it."""
