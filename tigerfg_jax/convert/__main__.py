"""`python -m tigerfg_jax.convert`: the CLIP converter's command line."""

from tigerfg_jax.convert import clip

if __name__ == "__main__":
  clip.run()
